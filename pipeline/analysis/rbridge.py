"""The bridge to R: one embedded R session (rpy2) with the functions of ``pipeline/analysis/R/*.R`` sourced
into a private environment, conversion of their results to Python, and a plain ``Rscript``
runner used to cross-check the embedded path.

The R files hold only functions (no I/O); everything that reads or writes files is here, in
Python, or in the small driver scripts this module writes for ``Rscript``.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any, Dict, List, Optional

import pandas as pd

# rpy2 logs 'Embedded R ended.' at interpreter exit, after pytest/CLI streams may be closed.
logging.getLogger("rpy2.rinterface_lib.embedded").setLevel(logging.WARNING)

R_DIR = Path(__file__).resolve().parent / "R"  # package data: found in an installed package too
R_FILES = ("capture.R", "glmm.R", "gam.R")
R_PACKAGES = ("glmmTMB", "mgcv", "car")

_LOCK = threading.RLock()
_ENV = None


class RUnavailable(RuntimeError):
    """R, rpy2 or an R package is missing (the message says which and how to get it)."""


def r_env():
    """The R environment holding the analysis functions (created once per process)."""
    global _ENV
    with _LOCK:
        if _ENV is not None:
            return _ENV
        # Starting R (rpy2) puts R's library path into this process's environment, e.g.
        # LD_LIBRARY_PATH=/usr/lib/R/lib:/usr/lib/x86_64-linux-gnu:... That only matters to child
        # processes, and there it is harmful: a child Python built with RUNPATH (pyenv) then loads
        # the system's libpython instead of its own. R has its libraries loaded already: restore.
        saved = {k: os.environ.get(k) for k in ("LD_LIBRARY_PATH",)}
        try:
            import rpy2.robjects as ro
        except Exception as e:  # ImportError, or R itself cannot be found/started
            raise RUnavailable(
                f"rpy2 cannot start R ({type(e).__name__}: {e}). The analysis needs R with "
                f"{', '.join(R_PACKAGES)} and `pip install .[analysis]` (make setup does both)"
            ) from e
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        missing = [p for p in R_PACKAGES if not bool(ro.r(f'isTRUE(requireNamespace("{p}", quietly = TRUE))')[0])]
        if missing:
            raise RUnavailable(
                f"R package(s) {missing} are not installed (Debian: "
                f"apt-get install {' '.join('r-cran-' + m.lower() for m in missing)})"
            )
        # Load car and glmmTMB namespaces so that car::Anova dispatches to Anova.glmmTMB.
        ro.r("suppressPackageStartupMessages({loadNamespace('glmmTMB'); loadNamespace('car'); loadNamespace('mgcv')})")
        env = ro.r("new.env(parent = globalenv())")
        for f in R_FILES:
            ro.r["sys.source"](str(R_DIR / f), envir=env)
        _ENV = env
        return env


def r_call(name: str, *args, **kwargs):
    """Call an analysis function (from R/*.R) with Python arguments; returns the R object."""
    env = r_env()
    with _LOCK:
        fn = env[name]
        return fn(*[to_r(a) for a in args], **{k: to_r(v) for k, v in kwargs.items()})


def to_r(x):
    """Python -> R: DataFrame -> data.frame, lists -> vectors, scalars -> length-1 vectors."""
    import rpy2.rinterface as ri
    import rpy2.robjects as ro
    from rpy2.robjects import pandas2ri
    from rpy2.robjects.conversion import localconverter

    if isinstance(x, ri.Sexp):
        return x
    if isinstance(x, pd.DataFrame):
        df = x.copy()
        for c in df.columns:
            if df[c].dtype == object:
                df[c] = df[c].astype(str)
        with localconverter(ro.default_converter + pandas2ri.converter):
            return ro.conversion.get_conversion().py2rpy(df)
    if isinstance(x, bool):
        return ro.BoolVector([x])
    if isinstance(x, int):
        return ro.IntVector([x])
    if isinstance(x, float):
        return ro.FloatVector([x])
    if isinstance(x, str):
        return ro.StrVector([x])
    if isinstance(x, (list, tuple)):
        if all(isinstance(v, str) for v in x):
            return ro.StrVector(list(x))
        return ro.FloatVector([float(v) for v in x])
    if hasattr(x, "tolist"):  # numpy
        return to_r(x.tolist())
    return x  # already an R object


def to_py(obj) -> Any:
    """R -> Python: named list -> dict, data.frame -> DataFrame, atomic vector -> list
    (NA -> None / nan), NULL -> None."""
    import rpy2.rinterface as ri
    import rpy2.robjects as ro
    from rpy2.robjects import pandas2ri
    from rpy2.robjects.conversion import localconverter

    if obj is None or obj is ri.NULL or isinstance(obj, ri.NULLType):
        return None
    if isinstance(obj, ri.ListSexpVector) and "data.frame" in list(ro.r["class"](obj)):
        with localconverter(ro.default_converter + pandas2ri.converter):
            df = ro.conversion.get_conversion().rpy2py(obj)
        return df.reset_index(drop=True)
    if isinstance(obj, ri.ListSexpVector):
        names = ro.r["names"](obj)
        items = (
            [to_py(v) for v in ro.vectors.ListVector(obj)]
            if not isinstance(obj, ro.vectors.ListVector)
            else [to_py(v) for v in obj]
        )
        if names is ri.NULL or isinstance(names, ri.NULLType):
            return items
        return {str(n): v for n, v in zip(names, items)}
    if isinstance(obj, ri.StrSexpVector):
        return [None if v is ri.NA_Character else str(v) for v in obj]
    if isinstance(obj, ri.BoolSexpVector):
        return [None if v is ri.NA_Logical else bool(v) for v in obj]
    if isinstance(obj, ri.IntSexpVector):
        return [None if v is ri.NA_Integer else int(v) for v in obj]
    if isinstance(obj, ri.FloatSexpVector):
        return [
            float("nan") if (v is ri.NA_Real or (isinstance(v, float) and math.isnan(v))) else float(v) for v in obj
        ]
    return obj


def scalar(x, default=None):
    """First element of a converted vector (or the value itself); default for None / empty."""
    if x is None:
        return default
    if isinstance(x, list):
        return x[0] if x else default
    return x


def as_list(x) -> List:
    if x is None:
        return []
    return list(x) if isinstance(x, list) else [x]


# ---------------------------------------------------------------------------------------------
# Plain Rscript (no rpy2): used to cross-check the embedded path and as a fallback.
# ---------------------------------------------------------------------------------------------
def rscript_path() -> str:
    exe = shutil.which("Rscript") or (
        os.path.join(os.environ["R_HOME"], "bin", "Rscript") if os.environ.get("R_HOME") else None
    )
    if not exe or not os.path.exists(exe):
        raise RUnavailable("Rscript is not on PATH (install R, or set R_HOME)")
    return exe


_GLMM_DRIVER = r"""
for (f in c(%(files)s)) source(file.path(%(rdir)s, f))
suppressPackageStartupMessages({loadNamespace("glmmTMB"); loadNamespace("car")})
d <- read.csv(%(data)s, stringsAsFactors = FALSE)
res <- plw_glmm_analyse(d, random_slopes = %(slopes)s, random_model = %(model)s, raw = %(raw)s,
                        conf_level = %(conf)s, n_sim = 0L)
out <- %(out)s
wr <- function(x, name) write.csv(x, file.path(out, name), row.names = FALSE)
if (!is.null(res$error)) writeLines(res$error, file.path(out, "error.txt"))
writeLines(c(res$fit_warnings, res$summary_warnings), file.path(out, "warnings.txt"))
if (!is.null(res$summary)) {
  s <- res$summary
  num <- function(x) formatC(x, digits = 17, format = "g")
  coef <- s$coef
  for (k in c("estimate", "std_error", "z", "p", "ci_low", "ci_high")) coef[[k]] <- num(coef[[k]])
  wr(coef, "coef.csv")
  an <- s$anova
  for (k in c("chisq", "p")) an[[k]] <- num(an[[k]])
  wr(an, "anova.csv")
  wr(data.frame(key = c("precision_phi", "loglik", "aic", "nobs", "pd_hessian"),
                value = c(num(s$precision_phi), num(s$loglik), num(s$aic), s$nobs,
                          as.character(s$pd_hessian))), "scalars.csv")
}
"""


def _rq(s: str) -> str:
    return '"' + str(s).replace("\\", "\\\\").replace('"', '\\"') + '"'


def glmm_rscript(
    data: pd.DataFrame,
    *,
    random_slopes: bool = True,
    random_model: bool = True,
    raw: bool = True,
    conf_level: float = 0.95,
    timeout: int = 600,
) -> Dict[str, Any]:
    """Fit the GLMM with a plain ``Rscript`` process on ``data`` (written to CSV, full precision).

    Returns dict(coef=DataFrame, anova=DataFrame, scalars=dict, warnings=list, error=str|None).
    """
    exe = rscript_path()
    with tempfile.TemporaryDirectory(prefix="plw_rscript_") as tmp:
        tmp = Path(tmp)
        csv = tmp / "data.csv"
        data.to_csv(csv, index=False, float_format="%.17g")
        script = tmp / "driver.R"
        script.write_text(
            _GLMM_DRIVER
            % dict(
                files=", ".join(_rq(f) for f in R_FILES),
                rdir=_rq(R_DIR),
                data=_rq(csv),
                slopes="TRUE" if random_slopes else "FALSE",
                model="TRUE" if random_model else "FALSE",
                raw="TRUE" if raw else "FALSE",
                conf=repr(float(conf_level)),
                out=_rq(tmp),
            )
        )
        proc = subprocess.run([exe, "--vanilla", str(script)], capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"Rscript failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")
        err = (tmp / "error.txt").read_text().strip() if (tmp / "error.txt").exists() else None
        warns = [w for w in (tmp / "warnings.txt").read_text().splitlines() if w.strip()]
        out: Dict[str, Any] = {"error": err, "warnings": warns, "stderr": proc.stderr}
        if (tmp / "coef.csv").exists():
            out["coef"] = pd.read_csv(tmp / "coef.csv")
            out["anova"] = pd.read_csv(tmp / "anova.csv")
            sc = pd.read_csv(tmp / "scalars.csv", dtype=str)
            out["scalars"] = dict(zip(sc["key"], sc["value"]))
        return out


def r_unavailable_reason() -> Optional[str]:
    """None when the embedded R with the analysis packages works, else why not (for test skips)."""
    try:
        r_env()
    except RUnavailable as e:
        return str(e)
    return None
