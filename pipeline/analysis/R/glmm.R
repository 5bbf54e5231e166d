# Beta GLMM of min-max scaled benchmark scores on transformed PLW (docs/study.md section 6; paper 5.2).
# Pure functions: data in, plain lists/data frames out. No file or console I/O.
# Needs: capture.R (plw_capture), glmmTMB, car (Anova method for glmmTMB).
#
# Data columns expected by plw_glmm_analyse():
#   score      response strictly inside (0, 1) (min-max scaled and squeezed by the caller)
#   w_p        transformed PLW (PLW ** 0.30103)
#   benchmark  benchmark name (random slopes)
#   model      pre-trained model name (random intercept)

# The model formula. The paper writes `poly(w_p, 2)`; its Table 3 coefficients and its critical
# PLW arithmetic (vertex -b / 2a = 0.652) are those of the raw polynomial, so raw = TRUE is the
# default. random_slopes = FALSE drops the benchmark term (one benchmark only); random_model = FALSE
# drops (1 | model) (one PTLM only).
plw_glmm_formula <- function(random_slopes = TRUE, random_model = TRUE, raw = TRUE) {
  p <- sprintf("poly(w_p, 2, raw = %s)", if (isTRUE(raw)) "TRUE" else "FALSE")
  rhs <- p
  if (isTRUE(random_slopes)) rhs <- paste0(rhs, " + (0 + ", p, " | benchmark)")
  if (isTRUE(random_model)) rhs <- paste0(rhs, " + (1 | model)")
  paste("score ~", rhs)
}

# Readable names for the fixed-effect terms: raw -> intercept, w_p, w_p2; orthogonal -> poly1, poly2.
plw_glmm_term_names <- function(terms, raw = TRUE) {
  out <- terms
  out[terms == "(Intercept)"] <- "intercept"
  is1 <- grepl("^poly\\(.*\\)1$", terms)
  is2 <- grepl("^poly\\(.*\\)2$", terms)
  out[is1] <- if (isTRUE(raw)) "w_p" else "poly1"
  out[is2] <- if (isTRUE(raw)) "w_p2" else "poly2"
  out
}

# optimizer: "nlminb" (glmmTMB's default) or an optim() method such as "BFGS" (the usual
# remedy tried when nlminb reports a convergence problem).
plw_glmm_fit <- function(data, formula, optimizer = "nlminb") {
  data <- as.data.frame(data)
  data$benchmark <- factor(data$benchmark)
  data$model <- factor(data$model)
  control <- if (identical(optimizer, "nlminb")) glmmTMB::glmmTMBControl() else
    glmmTMB::glmmTMBControl(optimizer = stats::optim, optArgs = list(method = optimizer))
  plw_capture(glmmTMB::glmmTMB(stats::as.formula(formula), data = data,
                               family = glmmTMB::beta_family(link = "logit"), control = control))
}

# Coefficients (Wald SE/CI), the Wald chi-square test of the w_p terms (car::Anova, type II),
# random-effect standard deviations and correlations, convergence diagnostics. Each part is
# computed on its own: a singular fit still yields its coefficients (with NA standard errors),
# and the failing part's error is returned in `errors`.
plw_glmm_summary <- function(fit, raw = TRUE, conf_level = 0.95) {
  errors <- character(0)
  part <- function(name, expr) {
    r <- tryCatch(expr, error = function(e) {
      errors <<- c(errors, paste0(name, ": ", conditionMessage(e)))
      NULL
    })
    r
  }
  zq <- stats::qnorm(1 - (1 - conf_level) / 2)
  coef <- part("coefficients", {
    cf <- summary(fit)$coefficients$cond
    data.frame(
      term = plw_glmm_term_names(rownames(cf), raw), r_term = rownames(cf),
      estimate = unname(cf[, 1]), std_error = unname(cf[, 2]),
      z = unname(cf[, 3]), p = unname(cf[, 4]),
      ci_low = unname(cf[, 1] - zq * cf[, 2]), ci_high = unname(cf[, 1] + zq * cf[, 2]),
      stringsAsFactors = FALSE)
  })
  if (is.null(coef)) {  # summary() itself failed: estimates without standard errors
    b <- glmmTMB::fixef(fit)$cond
    coef <- data.frame(term = plw_glmm_term_names(names(b), raw), r_term = names(b),
                       estimate = unname(b), std_error = NA_real_, z = NA_real_, p = NA_real_,
                       ci_low = NA_real_, ci_high = NA_real_, stringsAsFactors = FALSE)
  }
  anova <- part("car::Anova", {
    an <- car::Anova(fit, type = "II")
    data.frame(term = rownames(an), chisq = an[, "Chisq"], df = an[, "Df"],
               p = an[, "Pr(>Chisq)"], stringsAsFactors = FALSE)
  })
  if (is.null(anova)) anova <- data.frame(term = character(0), chisq = numeric(0),
                                          df = numeric(0), p = numeric(0))

  re_sd <- data.frame(group = character(0), term = character(0), sd = numeric(0))
  re_cor <- data.frame(group = character(0), term1 = character(0), term2 = character(0),
                       corr = numeric(0))
  part("VarCorr", {
    vc <- glmmTMB::VarCorr(fit)$cond
    for (g in names(vc)) {
      s <- attr(vc[[g]], "stddev")
      re_sd <- rbind(re_sd, data.frame(group = g, term = plw_glmm_term_names(names(s), raw),
                                       sd = unname(s), stringsAsFactors = FALSE))
      cm <- attr(vc[[g]], "correlation")
      if (!is.null(cm) && nrow(cm) > 1) {
        for (i in 1:(nrow(cm) - 1)) for (j in (i + 1):nrow(cm)) {
          re_cor <- rbind(re_cor, data.frame(
            group = g, term1 = plw_glmm_term_names(rownames(cm)[i], raw),
            term2 = plw_glmm_term_names(colnames(cm)[j], raw), corr = cm[i, j],
            stringsAsFactors = FALSE))
        }
      }
    }
  })

  vcov_df <- part("vcov", {
    V <- as.matrix(stats::vcov(fit)$cond)
    v <- data.frame(term = plw_glmm_term_names(rownames(V), raw), V, check.names = FALSE,
                    stringsAsFactors = FALSE)
    names(v) <- c("term", plw_glmm_term_names(colnames(V), raw))
    v
  })

  list(
    coef = coef, anova = anova, re_sd = re_sd, re_cor = re_cor, vcov = vcov_df,
    precision_phi = unname(stats::sigma(fit)),
    loglik = as.numeric(stats::logLik(fit)), aic = stats::AIC(fit), nobs = stats::nobs(fit),
    # the (Laplace) log-likelihood at the optimizer's solution; logLik() is NA when the Hessian is
    # not positive definite, this one is not, so fits by different optimizers can be compared
    loglik_optimum = -as.numeric(plw_or(fit$fit$objective, NA_real_)),
    optimizer_convergence = as.integer(plw_or(fit$fit$convergence, NA_integer_)),
    optimizer_message = as.character(plw_or(fit$fit$message, "")),
    pd_hessian = isTRUE(fit$sdr$pdHess),
    errors = errors
  )
}

# DHARMa's method, written with simulate(): scaled (PIT) quantile residuals of the observed
# response against n_sim responses simulated from the fitted model (random effects re-simulated,
# DHARMa's default for glmmTMB), then
#   uniformity: KS test of the residuals against U(0, 1) (DHARMa::testUniformity);
#   dispersion: sd(observed - fitted) vs the same for each simulated response, two-sided
#               simulation p-value (DHARMa::testDispersion, refit = FALSE);
#   outliers:   residuals outside the simulation envelope (< 1/(n_sim+1) or > 1 - 1/(n_sim+1)),
#               exact binomial test against the expected rate 2/(n_sim+1)
#               (DHARMa::testOutliers, type = "binomial", the right choice for continuous data).
plw_sim_residuals <- function(fit, n_sim = 250L, seed = 1L) {
  obs <- stats::model.response(stats::model.frame(fit))
  sims <- as.matrix(stats::simulate(fit, nsim = n_sim, seed = seed))
  # DHARMa's fitted values for mixed models: population level (random effects set to zero),
  # matching the unconditional simulations.
  fitted_resp <- unname(as.numeric(stats::predict(fit, type = "response", re.form = NA)))
  set.seed(seed)
  res <- vapply(seq_along(obs), function(i) {
    lo <- mean(sims[i, ] < obs[i])
    hi <- mean(sims[i, ] <= obs[i])
    if (lo == hi) lo else stats::runif(1, lo, hi)
  }, numeric(1))
  ks <- suppressWarnings(stats::ks.test(res, "punif"))
  spread <- function(x) stats::sd(x - fitted_resp)
  o <- spread(obs)
  s <- apply(sims, 2, spread)
  disp_p <- min(1, 2 * min(mean(s <= o), mean(s >= o)))
  thr <- 1 / (n_sim + 1)
  n_out <- sum(res < thr) + sum(res > 1 - thr)
  bt <- stats::binom.test(n_out, length(res), p = 2 * thr)
  list(
    n_sim = as.integer(n_sim), n_obs = length(obs),
    scaled_residuals = res, fitted = fitted_resp, observed = unname(as.numeric(obs)),
    uniformity_ks_d = unname(ks$statistic), uniformity_p = ks$p.value,
    dispersion_ratio = o / mean(s), dispersion_p = disp_p,
    outliers = as.integer(n_out), outliers_expected = length(res) * 2 * thr,
    outlier_p = bt$p.value
  )
}

# Everything for one dataset: fit, summary, residual checks. Every warning and message raised
# on the way is returned (fit_warnings / summary_warnings / residual_warnings), never printed.
plw_glmm_analyse <- function(data, random_slopes = TRUE, random_model = TRUE, raw = TRUE,
                             conf_level = 0.95, n_sim = 250L, seed = 1L, optimizer = "nlminb") {
  formula <- plw_glmm_formula(random_slopes, random_model, raw)
  f <- plw_glmm_fit(data, formula, optimizer = optimizer)
  out <- list(formula = formula, optimizer = optimizer,
              fit_warnings = f$warnings, fit_messages = f$messages,
              error = f$error, summary_warnings = character(0),
              residual_warnings = character(0))
  if (is.null(f$value)) return(out)
  s <- plw_capture(plw_glmm_summary(f$value, raw = raw, conf_level = conf_level))
  out$summary_warnings <- s$warnings
  if (is.null(s$value)) {
    out$error <- paste("summary failed:", s$error)
    return(out)
  }
  out$summary <- s$value
  if (n_sim > 0) {
    r <- plw_capture(plw_sim_residuals(f$value, n_sim = n_sim, seed = seed))
    out$residual_warnings <- r$warnings
    if (is.null(r$value)) out$residual_error <- r$error else out$residuals <- r$value
  }
  out
}
