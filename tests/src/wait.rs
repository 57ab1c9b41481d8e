//! Bounded poll loops. Every wait in the lab has a deadline and says what it waited for when it gives up.

use std::thread;
use std::time::{Duration, Instant};

use anyhow::{Result, anyhow};

/// An error that ends a wait at once instead of counting as "not yet" (a process that died will not recover).
#[derive(Debug)]
pub struct Abort(pub String);

impl std::fmt::Display for Abort {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Abort {}

/// Wraps `error` so that [`until`] gives up immediately when a probe returns it.
pub fn abort(error: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(Abort(format!("{error:#}")))
}

/// Calls `probe` every `interval` until it returns `Ok(Some(value))` or `timeout` passes. `Ok(None)` and `Err`
/// both mean "not yet" (the last error is part of the failure message), except an [`Abort`] error, which ends the
/// wait at once.
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
            Err(e) if e.is::<Abort>() => return Err(e.context(format!("gave up waiting for {what}"))),
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
