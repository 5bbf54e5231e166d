"""The analysis stage: collect the run store, aggregate, regress, draw, report, suggest.

Modules: ``collect`` (run store -> tidy table), ``aggregates`` (scores, simple/relative aggregates,
per-dataset checks), ``glmm`` (beta GLMM per dataset, R glmmTMB), ``critical`` (critical PLW),
``gam`` (mgcv GAM across datasets, optimal PLW per R_g), ``figures``, ``report`` (Markdown),
``suggest`` (R_g of a dataset and the recommended PLW), ``stage`` (all of it), ``rbridge`` (R via
rpy2 and Rscript), ``simulate`` (synthetic data for tests). Entry point: ``python -m
pipeline.analysis`` (see ``docs/analysis.md``); the R code is in ``R/``.
"""
