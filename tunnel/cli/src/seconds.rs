//! Durations given in (fractional) seconds on the command line or in the environment.
use std::time::Duration;

/// A clap value parser: a positive, finite number of seconds.
pub fn positive(s: &str) -> Result<Duration, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(v > 0.0 && v.is_finite()) {
        return Err(format!("{s:?}: expected a positive number of seconds"));
    }
    Duration::try_from_secs_f64(v).map_err(|e| format!("{s:?}: {e}"))
}

/// A clap value parser: zero or more (finite) seconds.
pub fn non_negative(s: &str) -> Result<Duration, String> {
    if s.trim().parse::<f64>() == Ok(0.0) {
        return Ok(Duration::ZERO);
    }
    positive(s).map_err(|e| e.replace("a positive", "a non-negative"))
}

/// A clap value parser: a positive, finite number of hours.
pub fn positive_hours(s: &str) -> Result<Duration, String> {
    let d = positive(s).map_err(|e| e.replace("seconds", "hours"))?;
    d.checked_mul(3600)
        .ok_or_else(|| format!("{s:?}: too many hours"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positive_seconds_and_hours_only() {
        assert_eq!(positive("1.5"), Ok(Duration::from_millis(1500)));
        assert_eq!(positive_hours("2"), Ok(Duration::from_secs(7200)));
        assert_eq!(non_negative("0"), Ok(Duration::ZERO));
        assert_eq!(non_negative("2"), Ok(Duration::from_secs(2)));
        assert!(non_negative("-1").unwrap_err().contains("non-negative"));
        for bad in ["0", "-1", "nan", "inf", "x", ""] {
            assert!(positive(bad).is_err(), "{bad}");
            assert!(positive_hours(bad).unwrap_err().contains("hours"), "{bad}");
        }
    }
}
