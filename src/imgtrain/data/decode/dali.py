"""``data.decode.device: dali``: the GPU-decode path of :mod:`gpu_decode` with NVIDIA DALI in place of torchvision.

Only the main-process side changes: loader workers, sampler, crop/flip draws and the batch layout are
``data.decode.device: gpu``'s (so exactly-once sampling and exact resume hold unchanged); the batch of encoded JPEGs
is decoded by DALI (nvJPEG / hardware decoder on the GPU, ROI decode of the crop window only), resized
(antialiased) and flipped in one DALI pipeline fed by ``external_source``. Optional: ``pip install
nvidia-dali-cuda130`` (or ``-cuda120``; the ``dali`` extra), with a ConfigError naming ``data.decode.device`` when it
is missing. Checked on the CPU (DALI's CPU operators, ``device=None``); not run or measured on a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from imgtrain.data.decode.gpu import GpuBatchDecoder, import_dali


class DaliBatchDecoder(GpuBatchDecoder):
    """:class:`GpuBatchDecoder` with the JPEG part (decode + crop + resize + flip) done by one DALI pipeline."""

    def __init__(self, image_size: int, device: torch.device, max_batch: int, threads: int = 2):
        super().__init__(image_size, device)
        dali, fn, types = import_dali()
        on_gpu = device.type == "cuda"
        self._dali = dali

        @dali.pipeline_def(
            batch_size=max_batch,
            num_threads=threads,
            device_id=(device.index or 0) if on_gpu else None,
            exec_dynamic=True,
            prefetch_queue_depth=1,  # one batch in, one batch out per call: nothing is fed ahead
        )
        def pipeline():
            enc = fn.external_source(name="enc", dtype=types.UINT8)
            anchor = fn.external_source(name="anchor", dtype=types.FLOAT)  # (x, y) of the crop window
            shape = fn.external_source(name="shape", dtype=types.FLOAT)  # (width, height)
            flip = fn.external_source(name="flip", dtype=types.INT32)
            img = fn.decoders.image_slice(
                enc,
                anchor,
                shape,
                device="mixed" if on_gpu else "cpu",
                output_type=types.RGB,
                normalized_anchor=False,
                normalized_shape=False,
                axis_names="WH",
            )
            img = fn.resize(
                img, size=[image_size, image_size], antialias=True, interp_type=types.INTERP_LINEAR
            )
            return fn.transpose(fn.flip(img, horizontal=flip), perm=[2, 0, 1])

        self._pipeline = pipeline
        self._build()

    def _build(self) -> None:
        self.pipe = self._pipeline()
        self.pipe.build()

    def _crop_batch(self, jpegs: list[torch.Tensor], params: list[list[int]]) -> list[torch.Tensor | None]:
        if not jpegs:
            return []
        p = self.pipe
        p.feed_input("enc", [j.numpy() for j in jpegs])
        p.feed_input("anchor", [np.array([left, top], np.float32) for top, left, _, _, _ in params])
        p.feed_input("shape", [np.array([w, h], np.float32) for _, _, h, w, _ in params])
        p.feed_input("flip", [np.array(f, np.int32) for *_, f in params])
        try:
            (out,) = p.run()
        except (RuntimeError, IndexError):
            # A JPEG DALI rejects leaves the pipeline unusable: build a new one, then decode one by one to
            # find the culprit (the others still count).
            self._build()
            if len(jpegs) == 1:
                return [None]
            return [self._crop_batch([j], [q])[0] for j, q in zip(jpegs, params, strict=True)]
        from nvidia.dali.plugin.pytorch import feed_ndarray

        dense = out.as_tensor()  # every image is image_size x image_size: one dense batch
        dst = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
        stream = torch.cuda.current_stream(self.device) if self.device.type == "cuda" else None
        feed_ndarray(dense, dst, cuda_stream=stream)  # copies on the prefetcher's stream, no host round trip
        return list(dst)
