//! The one connect-with-backoff loop: retry an async attempt with growing
//! pauses until it succeeds or a deadline would pass.

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;

/// Pauses between attempts: `first`, doubling up to `max`.
#[derive(Clone, Copy, Debug)]
pub struct Backoff {
    pub first: Duration,
    pub max: Duration,
}

/// How retrying ended without success.
#[derive(Debug, PartialEq, Eq)]
pub enum GaveUp<E> {
    /// The last attempt failed and the next would start past the deadline.
    Failed(E),
    /// An attempt was still running at the deadline.
    Deadline,
}

/// Calls `attempt` until it returns Ok, pausing per `backoff` between
/// failures; each attempt is cut off at `deadline`. `on_retry` sees each
/// error that is retried (for debug logs).
pub async fn retry<T, E, Fut>(
    deadline: Instant,
    backoff: Backoff,
    mut attempt: impl FnMut() -> Fut,
    mut on_retry: impl FnMut(&E),
) -> Result<T, GaveUp<E>>
where
    Fut: Future<Output = Result<T, E>>,
{
    let mut pause = backoff.first;
    loop {
        match tokio::time::timeout_at(deadline, attempt()).await {
            Ok(Ok(v)) => return Ok(v),
            Ok(Err(e)) if Instant::now() + pause < deadline => {
                on_retry(&e);
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(backoff.max);
            }
            Ok(Err(e)) => return Err(GaveUp::Failed(e)),
            Err(_) => return Err(GaveUp::Deadline),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FAST: Backoff = Backoff {
        first: Duration::from_millis(1),
        max: Duration::from_millis(4),
    };

    #[tokio::test]
    async fn retries_until_an_attempt_succeeds() {
        let mut calls = 0;
        let mut retried = 0;
        let deadline = Instant::now() + Duration::from_secs(10);
        let got = retry(
            deadline,
            FAST,
            || {
                calls += 1;
                let n = calls;
                async move {
                    if n < 4 {
                        Err(n)
                    } else {
                        Ok("up")
                    }
                }
            },
            |_| retried += 1,
        )
        .await;
        assert_eq!(got, Ok("up"));
        assert_eq!((calls, retried), (4, 3));
    }

    #[tokio::test]
    async fn gives_up_with_the_last_error_or_at_the_deadline() {
        let deadline = Instant::now() + Duration::from_millis(30);
        let got: Result<(), _> = retry(deadline, FAST, || async { Err("refused") }, |_| {}).await;
        assert_eq!(got, Err(GaveUp::Failed("refused")));
        let deadline = Instant::now() + Duration::from_millis(20);
        let got: Result<(), GaveUp<()>> = retry(
            deadline,
            FAST,
            std::future::pending::<Result<(), ()>>,
            |_| {},
        )
        .await;
        assert_eq!(got, Err(GaveUp::Deadline));
    }
}
