"""raytrain_align: alignment-handbook recipes on a Ray cluster (Ray Train + DeepSpeed ZeRO-3 + TRL).

Data flows recipe -> plan -> prepare (Ray Data) -> train (Ray Train worker) -> export; one module each.
"""

__version__ = "0.1.0"
