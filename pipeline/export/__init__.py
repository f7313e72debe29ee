"""Exporters: a shard directory -> another project's on-disk format, which that project loads unchanged.

- ``pixelsplat.export_pixelsplat``: ``<out>/<split>/NNNNNN.torch`` chunks + ``index.json`` (pixelSplat,
  MVSplat, DepthSplat), and ``evaluation_index_<dataset>.json`` when the shards carry one;
- ``lvsm.export_lvsm``: ``<out>/<split>/{images/<key>/NNNNN.png, metadata/<key>.json, full_list.txt}``
  (LVSM's ``data/dataset_scene.py``);
- ``nerfstudio.export_nerfstudio``: ``<out>/<key>/{transforms.json, images/}`` per scene (nerfstudio,
  gsplat).

Each reads the shards only through ``pipeline.reader``, names every scene by its sample key, streams
(memory bounded by one chunk or one scene), writes every file atomically (``pipeline.durable``),
resumes a stopped run, writes the same bytes on every run and refuses a non-empty directory it did
not write. The camera conventions are ``pipeline.export.conventions`` (docs/EXPORT.md).
"""
