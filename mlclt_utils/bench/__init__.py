"""Speed benchmarks that print figures: model training (``train``) and CLT training
(``clt``). ``python -m mlclt_utils.bench {peak,train,clt}``."""
