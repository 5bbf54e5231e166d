# Condition capture shared by the GLMM and GAM code (no I/O).
#
# plw_capture(expr) evaluates `expr` and returns
#   list(value = <result, or NULL on error>, error = <message or NULL>,
#        warnings = <character>, messages = <character>)
# Warnings and messages are muffled (nothing reaches R's console) and handed back to the
# caller, so that convergence warnings from glmmTMB/TMB end up in the Python report.

plw_capture <- function(expr) {
  warnings <- character(0)
  messages <- character(0)
  error <- NULL
  value <- withCallingHandlers(
    tryCatch(expr, error = function(e) {
      error <<- conditionMessage(e)
      NULL
    }),
    warning = function(w) {
      warnings <<- c(warnings, conditionMessage(w))
      invokeRestart("muffleWarning")
    },
    message = function(m) {
      messages <<- c(messages, sub("\n$", "", conditionMessage(m)))
      invokeRestart("muffleMessage")
    }
  )
  list(value = value, error = error, warnings = unique(warnings), messages = unique(messages))
}

# First element or a default (NULL-safe scalar access).
plw_or <- function(x, default) if (is.null(x) || length(x) == 0) default else x
