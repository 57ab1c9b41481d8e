//! Bounded poll loops. Every wait in the lab has a deadline and says what it waited for when it gives up.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

/// Calls `probe` every `interval` until it returns `Ok(Some(value))` or `timeout` passes. `Ok(None)` and `Err`
/// both mean "not yet"; the last error is part of the failure message.
pub fn until<T>(
    what: &str,
    timeout: Duration,
    interval: Duration,
    mut probe: impl FnMut() -> Result<Option<T>>,
) -> Result<T> {
    let start = Instant::now();
    let deadline = start + timeout;
    let mut last_error = None;
    loop {
        match probe() {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => {}
            Err(e) => last_error = Some(e),
        }
        if Instant::now() >= deadline {
            let detail = last_error.map(|e| format!("; last error: {e:#}")).unwrap_or_default();
            return Err(anyhow!(
                "timed out after {:?} waiting for {what}{detail}",
                start.elapsed()
            ));
        }
        thread::sleep(interval);
    }
}

/// [`until`] for a plain condition.
pub fn until_true(what: &str, timeout: Duration, interval: Duration, mut probe: impl FnMut() -> bool) -> Result<()> {
    until(what, timeout, interval, || Ok(probe().then_some(())))
}
