"""FID during training: every K steps, FID of a few thousand EMA samples against reference statistics.

    python train.py callbacks=fid callbacks.fid.ref=VIRTUAL_imagenet256_labeled.npz           # conf/callbacks/fid.yaml
    python train.py experiment=quickstart callbacks=fid callbacks.fid.ref=digits_ref.npz \\
        callbacks.fid.every_n_steps=500 callbacks.fid.num_samples=1000

Logged as `val/fid` (and `val/fid_best`, the lowest so far); every measurement is kept in the
callback's state, so the history and the best survive a resume, and the run's summary
(dit.training.run_summary) holds the last and the best. FID on 5K samples is biased upwards against
FID-50K (the bias shrinks with N), so it tracks progress; the paper's numbers come from
`python -m dit.fid` on 50K samples.

The state also records how the values were measured (`FIDMonitor.protocol`: feature space and its
weights, reference statistics, number of samples, sampler, guidance, VAE, EMA or live weights). A
resume under another protocol (callbacks=fid after fid_digits, another ref or num_samples, ...)
starts a new history and best, and keeps the checkpoint's apart with their protocol (`earlier`;
summary.json's `metric.earlier`), never merged with the new values.

With `features=digits` the distance is taken in the features of a small classifier fitted on the real
digits (dit.evaluation.digit_features), which need no download; it is logged as `val/digits_fd`, a
"digits FD" and not an FID (conf/callbacks/fid_digits.yaml).
"""

import hashlib
import json
import math

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback, WeightAveraging
from tqdm import tqdm

from dit.data.decoding import make_decoder
from dit.data.vae import to_uint8
from dit.diffusion import batch_generator, draw
from dit.diffusion.flow import is_flow
from dit.diffusion.guidance import check_guidance
from dit.errors import UsageError
from dit.evaluation.digit_features import digit_feature_network, digit_features, digit_reference
from dit.evaluation.fid import POOL, UInt8Images, features, frechet_distance, inception, load_reference
from dit.evaluation.progress import shown_in_training
from dit.platform.compat import averaged_model
from dit.training.manifest import weights_digest

# The logged key of each feature space, and what its values are, for logs and chart axes.
METRICS = {"inception": ("val/fid", "FID"), "digits": ("val/digits_fd", "digits FD")}


class FIDMonitor(Callback):
    """
    Args:
        ref: the reference (see `dit.fid.load_reference`): statistics `.npz` (ADM's
            VIRTUAL_imagenet256_labeled.npz, or one written by `python -m dit.fid --save-ref-stats`), a
            folder of real images, or "digits". Computed once, at the start of the run.
        every_n_steps: measure after every this many optimizer steps.
        num_samples: samples per measurement, spread over all devices.
        inception_weights: a local copy of torch-fidelity's Inception weights (None: download).
        sampler: a `dit.diffusion.Sampler` (conf: the run's `sampler`, the paper's 250 DDPM steps).
        guidance_scale, guidance, guidance_interval: classifier-free guidance; the default is the
            paper's FID protocol for its scaling results (no guidance, Table 4).
        vae: the VAE that decodes latents ("mse", the paper's Table 4 decoder; "ema"; or a folder).
            Not used for pixel data (1 or 3 channels, such as the digits).
        batch_size: samples drawn (and Inception images) per device at a time.
        seed: sample i has label i mod classes, and batch k (samples [kB, (k+1)B)) draws from
            `batch_generator(seed, k)`, so measurements differ only by the weights, not by the draw,
            and not by the number of devices.
        features: "inception" (FID, torch-fidelity's Inception-v3) or "digits" (the digits FD of
            dit.evaluation.digit_features, offline; `ref` must then be "digits").
    """

    def __init__(
        self,
        ref,
        sampler,
        every_n_steps=10000,
        num_samples=5000,
        inception_weights=None,
        guidance_scale=1.0,
        guidance="auto",
        guidance_interval=(0.0, 1.0),
        vae="mse",
        batch_size=64,
        seed=0,
        features="inception",
    ):
        if features not in METRICS:
            raise UsageError(f"callbacks.fid.features must be one of {', '.join(METRICS)}, got {features!r}")
        if features == "digits" and ref != "digits":
            raise UsageError(
                f"callbacks.fid.features=digits measures against the real digits: set callbacks.fid.ref=digits, not {ref!r}"
            )
        self.features = features
        self.key, self.metric_name = METRICS[features]
        self.ref = ref
        self.every_n_steps = every_n_steps
        self.num_samples = num_samples
        self.inception_weights = inception_weights
        self.sampler = sampler
        self.guidance_scale = guidance_scale
        self.guidance = guidance
        self.guidance_interval = check_guidance(guidance, guidance_interval, "callbacks.fid")
        self.vae_name = vae
        self.batch_size = batch_size
        self.seed = seed
        self.best = math.inf
        self.history = []  # (step, value) of every measurement
        self.protocol = None  # how the values are measured (`measurement_protocol`), known from `setup`
        self.earlier = []  # what was measured under earlier protocols of this run (`load_state_dict`)
        self._restored = None  # a state loaded before `setup`, compared with the protocol there
        self._rank_zero = True
        self.extractor = self.reference = self.decoder = None

    def setup(self, trainer, pl_module, stage):
        if stage != "fit":
            return
        data = trainer.datamodule
        if self.features == "digits":
            if not getattr(data, "pixels", False) or pl_module.model.input_size != 8:
                raise UsageError("callbacks.fid.features=digits measures 8×8 digits; train on data=digits")
            self.extractor = digit_feature_network()
            self.reference = digit_reference(self.extractor) if trainer.is_global_zero else None
            self.decoder = make_decoder(True, getattr(data, "scale_factor", 1.0))
            self.settle_protocol(trainer, pl_module)
            return
        # Every rank extracts its share. torch-fidelity moves batches to CUDA only, so elsewhere (CPU, TPU)
        # the extractor stays on the CPU.
        self.extractor = inception(
            self.inception_weights, pl_module.device if pl_module.device.type == "cuda" else "cpu"
        )
        pixels = getattr(data, "pixels", False)
        self.decoder = make_decoder(
            pixels, getattr(data, "scale_factor", 1.0), None if pixels else self.vae_name, pl_module.device
        )
        if trainer.is_global_zero:
            resolution = pl_module.model.input_size * self.decoder.upsampling
            self.reference = load_reference(
                self.ref, self.extractor, resolution, self.batch_size, progress=shown_in_training(trainer)
            )
        self.settle_protocol(trainer, pl_module)

    def settle_protocol(self, trainer, pl_module):
        """Sets `protocol` (the same on every rank: rank 0, which alone holds the reference, digests it
        and the feature network), then compares a state restored before now with it."""
        self._rank_zero = trainer.is_global_zero
        identity = (
            dict(
                feature_weights=weights_digest(self.extractor.state_dict()), ref_stats=statistics_digest(self.reference)
            )
            if trainer.is_global_zero
            else None
        )
        identity = trainer.strategy.broadcast(identity, src=0)
        self.protocol = self.measurement_protocol(trainer, pl_module, **identity)
        if self._restored is not None:
            state, self._restored = self._restored, None
            self.load_state_dict(state)

    def measurement_protocol(self, trainer, pl_module, feature_weights, ref_stats):
        """What decides the value of a measurement but the weights measured: every setting that may
        differ between two launches of one run (the config's callbacks.fid, sampler, ...), as plain
        JSON values.

        Not in it: `seed` and `batch_size` (sample i's noise comes from batch i // batch_size of
        `batch_generator(seed, ...)`), which choose which samples are drawn, not what is measured: a
        draw of another seed has the same expected value; and the number of devices, which changes
        nothing. `ref` is the reference's name, shown but not compared (a copy of the same statistics
        elsewhere is the same reference): `ref_stats`, a digest of its mean and covariance, is compared."""
        data = trainer.datamodule
        pixels = getattr(data, "pixels", False)
        guided = float(self.guidance_scale) != 1.0  # at scale 1 the variant and interval are never used
        guidance = self.guidance
        if guidance == "auto":  # as dit.diffusion.sampling.draw resolves it
            guidance = "all_channels" if is_flow(pl_module.diffusion_options) else "official"
        averaging = any(isinstance(c, WeightAveraging) for c in trainer.callbacks)
        protocol = dict(
            metric=self.features,
            feature_weights=feature_weights,
            ref=str(self.ref),
            ref_stats=ref_stats,
            num_samples=int(self.num_samples),
            sampler=self.sampler.settings(),
            guidance_scale=float(self.guidance_scale),
            guidance=guidance if guided else None,
            guidance_interval=list(self.guidance_interval) if guided else None,
            vae=None if pixels or self.features == "digits" else str(self.vae_name),
            weights="ema" if averaging else "live",
        )
        return json.loads(json.dumps(protocol, default=str))  # as a checkpoint keeps it

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every_n_steps:
            return
        fid = trainer.strategy.broadcast(self.measure(trainer, pl_module), src=0)
        self.best = min(self.best, fid)
        self.history = [(s, v) for s, v in self.history if s != trainer.global_step] + [(trainer.global_step, fid)]
        if trainer.is_global_zero:
            weights = "live-weight" if (self.protocol or {}).get("weights") == "live" else "EMA"
            print(
                f"step {trainer.global_step}: {self.metric_name} {fid:.2f} on {self.num_samples} {weights} samples "
                f"(best {self.best:.2f}; {self.sampler!r}, {self.sampler.nfe} function evaluations, "
                f"guidance {self.guidance_scale})"
            )
            for logger in trainer.loggers:
                logger.log_metrics({self.key: fid, f"{self.key}_best": self.best}, step=trainer.global_step)

    def measure(self, trainer, pl_module):
        """FID of `num_samples` samples of the EMA weights; batches go round-robin to the ranks,
        each draws and extracts its own, rank 0 gathers the features and returns the FID (the
        other ranks return None)."""
        model = ema_backbone(trainer, pl_module)
        was_training = model.training
        model.eval()
        device = pl_module.device
        num_batches = math.ceil(self.num_samples / self.batch_size)
        per_rank = math.ceil(num_batches / trainer.world_size)
        mine = list(range(trainer.global_rank, num_batches, trainer.world_size))
        pool, indices = [], []
        # One bar, on rank 0 (dit.evaluation.progress), of all ranks' samples: in round j the ranks draw
        # batches [j·world, (j + 1)·world) together. leave=False: it is drawn under the training bar.
        with tqdm(
            total=self.num_samples,
            desc=f"{self.metric_name} samples",
            unit="img",
            leave=False,
            disable=not shown_in_training(trainer),
        ) as bar:
            for j in range(per_rank):
                # all_gather needs as many batches of one shape on every rank: a rank short of batches
                # draws one again and marks it -1, as the padding of a short last batch
                k = mine[j] if j < len(mine) else mine[-1] if mine else 0
                index = torch.arange(k * self.batch_size, min((k + 1) * self.batch_size, self.num_samples))
                labels = index % model.num_classes
                z = draw(
                    model,
                    self.sampler,
                    pl_module.diffusion_options,
                    labels,
                    batch_generator(self.seed, k, device),
                    self.guidance_scale,
                    self.guidance,
                    self.guidance_interval,
                )
                feats = self.extract(self.decoder(z)).to(device)
                pad = self.batch_size - len(index)
                pool.append(torch.cat([feats, feats.new_zeros(pad, feats.shape[1])]))
                marks = index if j < len(mine) else torch.full_like(index, -1)
                indices.append(torch.cat([marks, torch.full((pad,), -1)]).to(device))
                bar.update(min((j + 1) * trainer.world_size * self.batch_size, self.num_samples) - bar.n)
        model.train(was_training)
        pool, index = pl_module.all_gather(torch.cat(pool)), pl_module.all_gather(torch.cat(indices))
        if not trainer.is_global_zero:
            return None
        pool, index = pool.reshape(-1, pool.shape[-1]), index.reshape(-1)
        return frechet_distance(pool[index >= 0], self.reference)

    def extract(self, images):
        """The features FID compares, of decoded images in [-1, 1]."""
        if self.features == "digits":
            return digit_features(self.extractor, images).float()
        return features(self.extractor, UInt8Images(to_uint8(images)), self.batch_size)[POOL]

    def state_dict(self):
        return {
            "best": self.best,
            "history": [list(h) for h in self.history],
            "protocol": self.protocol,
            "earlier": self.earlier,
        }

    def load_state_dict(self, state_dict):
        """The history and best of a checkpoint, continued where they were measured as now; under
        another protocol the history and best start anew, and the checkpoint's go to `earlier`."""
        if self.protocol is None:  # before `setup` (Lightning restores callbacks after it): compared there
            self._restored = state_dict
            return
        history = [tuple(h) for h in state_dict.get("history", [])]  # checkpoints before the history: none
        best = state_dict["best"]
        self.earlier = list(state_dict.get("earlier", []))
        old = state_dict.get("protocol")
        if old is not None and not protocol_changes(old, self.protocol):
            self.best, self.history = best, history
            return
        self.best, self.history = math.inf, []
        if not history and not math.isfinite(best):
            return  # nothing was measured: nothing to set apart
        # A checkpoint written before the protocol was recorded has none: its values may have been
        # measured in any way (another metric, ref, num_samples ...), and merging them with these is the
        # mistake this check is for, so they are set apart too (protocol None: unknown), never lost.
        metric = old.get("metric") if old is not None else None
        key, name = METRICS.get(metric, (None, None))
        self.earlier.append(dict(protocol=old, key=key, name=name, best=best, history=[list(h) for h in history]))
        why = (
            f"the protocol changed ({', '.join(protocol_changes(old, self.protocol))})"
            if old is not None
            else "the checkpoint does not record how its values were measured (it predates that record)"
        )
        if self._rank_zero:
            print(
                f"FID monitor: {why}: history and best start anew; the checkpoint's {len(history)} "
                f"{name or 'earlier'} measurements are kept apart (summary.json's metric.earlier)",
                flush=True,
            )


def protocol_changes(old, new):
    """["num_samples: 200 -> 20", ...]: how protocol `new` differs from `old`; [] when it does not.
    The reference is compared by its statistics and named by its `ref`."""
    changes = []
    for key in [*new, *(k for k in old if k not in new)]:
        before, after = old.get(key), new.get(key)
        if key == "ref" or before == after:
            continue
        if key == "ref_stats":
            before, after = (f"{p.get('ref')} (statistics {str(p.get('ref_stats'))[:8]})" for p in (old, new))
            key = "ref"
        elif key == "sampler":
            before, after = sampler_shown(before), sampler_shown(after)
        elif key == "feature_weights":
            before, after, key = str(before)[:8], str(after)[:8], "feature network weights"
        changes.append(f"{key}: {before} -> {after}")
    return changes


def sampler_shown(settings):
    """DDPM(steps='250', clip_denoised=False), as a sampler's repr, from its `settings()`."""
    if not isinstance(settings, dict):
        return repr(settings)
    name = str(settings.get("class", "?")).rsplit(".", 1)[-1]
    return f"{name}({', '.join(f'{k}={v!r}' for k, v in settings.items() if k != 'class')})"


def statistics_digest(reference):
    """A digest of reference statistics {"mu", "sigma"} (as float64)."""
    h = hashlib.sha256()
    for key in ("mu", "sigma"):
        h.update(np.ascontiguousarray(np.asarray(reference[key], dtype=np.float64)).tobytes())
    return h.hexdigest()[:16]


def ema_backbone(trainer, pl_module):
    """The DiT with the EMA weights: the averaged copy that Lightning's `WeightAveraging` keeps
    (conf/callbacks/ema.yaml), or the live weights when a run has no EMA."""
    averaging = next((c for c in trainer.callbacks if isinstance(c, WeightAveraging)), None)
    average = averaged_model(averaging) if averaging is not None else None
    return pl_module.model if average is None else average.module.model
