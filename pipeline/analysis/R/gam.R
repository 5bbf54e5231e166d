# GAM of benchmark scores on untransformed PLW (w) and generation ratio R_g (r) across datasets
# (paper appendix D: `score ~ te(w, r, k = 3) + factor(b)`, R mgcv). Pure functions, no I/O.
# Needs: capture.R (plw_capture), mgcv.
#
# Data columns: score, w (PLW), r (dataset R_g), b (benchmark), m (PTLM; only if the formula uses it).

plw_gam_fit <- function(data, formula = "score ~ te(w, r, k = 3) + factor(b)", method = "GCV.Cp") {
  data <- as.data.frame(data)
  if ("b" %in% names(data)) data$b <- factor(data$b)
  if ("m" %in% names(data)) data$m <- factor(data$m)
  plw_capture(mgcv::gam(stats::as.formula(formula), data = data, method = method))
}

# The label of the smooth over both w and r (e.g. "te(w,r)").
plw_gam_wr_label <- function(fit) {
  for (s in fit$smooth) if (all(c("w", "r") %in% s$term)) return(s$label)
  stop("the GAM has no smooth over both w and r")
}

plw_gam_summary <- function(fit) {
  s <- summary(fit)
  st <- s$s.table
  pt <- s$p.table
  list(
    formula = paste(deparse(stats::formula(fit)), collapse = " "),
    r_sq = s$r.sq, dev_expl = s$dev.expl, n = s$n, method = fit$method,
    converged = isTRUE(fit$converged), gcv_ubre = unname(fit$gcv.ubre),
    smooth = data.frame(term = rownames(st), edf = unname(st[, "edf"]),
                        ref_df = unname(st[, "Ref.df"]), stat = unname(st[, 3]),
                        p = unname(st[, ncol(st)]), stringsAsFactors = FALSE),
    parametric = data.frame(term = rownames(pt), estimate = unname(pt[, 1]),
                            std_error = unname(pt[, 2]), p = unname(pt[, ncol(pt)]),
                            stringsAsFactors = FALSE),
    wr_label = plw_gam_wr_label(fit)
  )
}

# The w-r interaction surface on a grid: the te(w, r) term (centred, as mgcv fits it) with its
# standard error, and the full prediction at the reference level of the other covariates.
# The optimal w at a given r is the same for both (the other terms do not depend on w or r).
plw_gam_surface <- function(fit, w, r) {
  grid <- expand.grid(w = as.numeric(w), r = as.numeric(r))
  vars <- setdiff(all.vars(stats::formula(fit))[-1], c("w", "r"))
  for (v in vars) {
    ref <- fit$var.summary[[v]]
    grid[[v]] <- if (is.factor(ref)) factor(as.character(ref[1]), levels = levels(ref))
                 else if (length(ref) == 3) ref[2] else ref[1]
  }
  label <- plw_gam_wr_label(fit)
  pt <- stats::predict(fit, newdata = grid, type = "terms", se.fit = TRUE)
  pl <- stats::predict(fit, newdata = grid, type = "response")
  data.frame(w = grid$w, r = grid$r, term = unname(pt$fit[, label]),
             term_se = unname(pt$se.fit[, label]), prediction = unname(as.numeric(pl)))
}

# What a saved GAM file holds (written with saveRDS by the Python caller): the fitted model and
# the facts needed to use it later (subset, score range, R_g range, datasets).
plw_gam_bundle <- function(fit, subset, score_min, score_max, r_min, r_max, w_min, w_max,
                           datasets, benchmarks, scaling, models = "", test_double_benchmarks = "",
                           scratch_models = "") {
  list(gam = fit, subset = subset, score_range = c(score_min, score_max),
       r_range = c(r_min, r_max), w_range = c(w_min, w_max), datasets = datasets,
       benchmarks = benchmarks, scaling = scaling, created = format(Sys.time(), "%Y-%m-%dT%H:%M:%S"),
       mgcv_version = as.character(utils::packageVersion("mgcv")), models = models,
       test_double_benchmarks = test_double_benchmarks, scratch_models = scratch_models)
}
