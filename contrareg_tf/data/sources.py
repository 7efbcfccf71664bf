"""Which data set a job runs on: a user's description (``--data``: CSV or folder, ``dataset.load_description``)
or the built-in data of the config's ``data_source`` on the config's grid (``proxy.build_proxy``, built once in
``out_dir`` or in the cache folder named after its parameters, then reused). Sits above ``dataset`` and
``proxy`` so that neither imports the other's caller.
"""
from .dataset import Description, load_description
from .proxy import build_proxy


def resolve(cfg, data=None, out_dir=None) -> Description:
    """A data-set ``Description``: ``data`` (CSV / folder) if given, else the built-in data of the config's
    ``data_source`` at its grid (built once in ``out_dir`` or the cache folder ``proxy.build_proxy`` names after
    its parameters, then reused)."""
    if data is not None:
        return load_description(data, seed=cfg.seed)
    return build_proxy(out_dir, n_subjects=cfg.proxy_subjects, shape=tuple(cfg.inshape), spacing=cfg.spacing,
                       seed=cfg.seed, max_disp=cfg.proxy_max_disp, ndim=len(cfg.inshape), source=cfg.data_source)
