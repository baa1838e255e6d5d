//! The transport every API call goes through: bearer token, bounded requests in flight, the retry
//! policy, and latency measurement.
//!
//! It retries only what is safe to retry. A request that may already have been processed (a
//! create whose answer was lost: connection cut after sending, timeout, a 5xx) is handed back as
//! [`CallError::AnswerLost`] instead of being sent again; the FHIR client then searches before
//! trying again. Nothing here logs bodies, URLs with search values, or tokens above TRACE.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime};

use reqwest::Method;
use tokio::sync::Semaphore;
use url::Url;

use super::retry::{RetryPolicy, parse_retry_after};
use super::token::{AuthError, TokenManager};

/// One request to make.
#[derive(Clone, Debug)]
pub struct Call {
    pub method: Method,
    pub url: Url,
    pub body: Option<Vec<u8>>,
    pub content_type: &'static str,
    /// Whether sending it twice is harmless (reads, PUT at a known id, `PUT /CRID`).
    pub repeatable: bool,
}

impl Call {
    pub fn get(url: Url) -> Call {
        Call {
            method: Method::GET,
            url,
            body: None,
            content_type: FHIR_JSON,
            repeatable: true,
        }
    }
}

/// `application/fhir+json`.
pub const FHIR_JSON: &str = "application/fhir+json";

/// An answer with a status the caller must interpret (2xx, or a non-retryable 4xx).
#[derive(Clone, Debug)]
pub struct Reply {
    pub status: u16,
    pub location: Option<String>,
    pub body: Vec<u8>,
    pub attempts: u32,
}

/// A call that ended without an answer to interpret.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The request may have reached the server, and the answer did not come back.
    #[error("the answer was lost after {attempts} attempt(s): {detail}")]
    AnswerLost { attempts: u32, detail: String },
    /// Retries ran out. `status` is the last error status; `None` when no answer came (the
    /// target is unreachable) or when [`FAILING_STREAK`] calls in a row ran out of retries (the
    /// target is down though it answers): both stop the run.
    #[error("gave up after {attempts} attempts: {detail}")]
    GaveUp {
        attempts: u32,
        status: Option<u16>,
        detail: String,
    },
    #[error(transparent)]
    Auth(#[from] AuthError),
}

impl CallError {
    pub fn attempts(&self) -> u32 {
        match self {
            CallError::AnswerLost { attempts, .. } | CallError::GaveUp { attempts, .. } => {
                *attempts
            }
            CallError::Auth(_) => 1,
        }
    }
}

/// Counters for the run summary.
#[derive(Debug, Default)]
pub struct Stats {
    latencies_us: std::sync::Mutex<Vec<u64>>,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl Stats {
    fn record(&self, took: Duration) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut l) = self.latencies_us.lock() {
            l.push(took.as_micros() as u64);
        }
    }

    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    /// Request latency percentiles (p50, p95, p99), nearest-rank.
    pub fn percentiles(&self) -> Option<[Duration; 3]> {
        let mut l = self.latencies_us.lock().ok()?.clone();
        if l.is_empty() {
            return None;
        }
        l.sort_unstable();
        let at = |p: f64| {
            let rank = ((p * l.len() as f64).ceil() as usize).clamp(1, l.len());
            Duration::from_micros(l[rank - 1])
        };
        Some([at(0.50), at(0.95), at(0.99)])
    }
}

/// Calls in a row that ran out of retries on error statuses, with no answer to interpret in
/// between, after which the target counts as down. One such call may be the target's trouble with
/// one resource, and ends only that row; this many in a row stop the run (exit 3) instead of
/// rejecting every record the target could not take.
pub const FAILING_STREAK: u32 = 16;

/// Authenticated, bounded, retrying HTTP.
pub struct Transport {
    http: reqwest::Client,
    token: Option<Arc<TokenManager>>,
    retry: RetryPolicy,
    permits: Arc<Semaphore>,
    /// Calls that ran out of retries since the last answer to interpret.
    failing: AtomicU32,
    pub stats: Stats,
}

impl Transport {
    pub fn new(
        http: reqwest::Client,
        token: Option<Arc<TokenManager>>,
        retry: RetryPolicy,
        concurrency: usize,
    ) -> Transport {
        Transport {
            http,
            token,
            retry,
            permits: Arc::new(Semaphore::new(concurrency.max(1))),
            failing: AtomicU32::new(0),
            stats: Stats::default(),
        }
    }

    pub fn token(&self) -> Option<&Arc<TokenManager>> {
        self.token.as_ref()
    }

    pub fn retry_policy(&self) -> &RetryPolicy {
        &self.retry
    }

    /// Sends `call`, retrying what the policy allows. Returns the first answer worth interpreting.
    pub async fn send(&self, call: &Call) -> Result<Reply, CallError> {
        let mut attempts = 0u32;
        let mut refreshed = false;
        let mut bearer = match &self.token {
            Some(t) => Some(t.bearer().await?),
            None => None,
        };
        loop {
            attempts += 1;
            if attempts > 1 {
                self.stats.retries.fetch_add(1, Ordering::Relaxed);
            }
            let mut req = self
                .http
                .request(call.method.clone(), call.url.clone())
                .header(reqwest::header::ACCEPT, accept_for(call.content_type));
            if let Some(b) = &bearer {
                req = req.bearer_auth(b.value.expose());
            }
            if let Some(body) = &call.body {
                req = req
                    .header(reqwest::header::CONTENT_TYPE, call.content_type)
                    .body(body.clone());
            }
            let permit = self.permits.acquire().await;
            let started = Instant::now();
            let sent = req.send().await;
            let outcome = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let location = resp
                        .headers()
                        .get(reqwest::header::LOCATION)
                        .or_else(|| resp.headers().get("content-location"))
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_string);
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    match resp.bytes().await {
                        Ok(body) => Ok((status, location, retry_after, body.to_vec())),
                        Err(e) => Err((false, e.without_url().to_string())),
                    }
                }
                Err(e) => Err((e.is_connect(), e.without_url().to_string())),
            };
            self.stats.record(started.elapsed());
            drop(permit);

            let (retry_after, detail, status) = match outcome {
                Ok((401, _, _, _)) if !refreshed && self.token.is_some() => {
                    refreshed = true;
                    if let (Some(t), Some(b)) = (&self.token, &bearer) {
                        bearer = Some(t.refresh_after_rejection(b.generation).await?);
                    }
                    continue;
                }
                Ok((401, _, _, _)) if self.token.is_some() => {
                    return Err(AuthError::Unauthorized.into());
                }
                Ok((status, location, retry_after, body)) => {
                    if !RetryPolicy::status_is_retryable(status) {
                        self.failing.store(0, Ordering::Relaxed);
                        return Ok(Reply {
                            status,
                            location,
                            body,
                            attempts,
                        });
                    }
                    // 408 and 429 mean the request was not processed; any other 5xx may come
                    // after the server stored a create.
                    if !call.repeatable && !matches!(status, 408 | 429) {
                        return Err(CallError::AnswerLost {
                            attempts,
                            detail: format!("HTTP {status}"),
                        });
                    }
                    (retry_after, format!("HTTP {status}"), Some(status))
                }
                Err((not_connected, detail)) => {
                    if !call.repeatable && !not_connected {
                        return Err(CallError::AnswerLost { attempts, detail });
                    }
                    (None, detail, None)
                }
            };
            tracing::trace!(attempts, %detail, "Request failed; retrying.");
            if !self.retry.may_retry(attempts) {
                let streak = match status {
                    Some(_) => self.failing.fetch_add(1, Ordering::Relaxed) + 1,
                    None => 0,
                };
                if streak >= FAILING_STREAK {
                    return Err(CallError::GaveUp {
                        attempts,
                        status: None,
                        detail: format!(
                            "{detail}; {streak} requests in a row failed after every retry, so \
                             the target counts as down"
                        ),
                    });
                }
                return Err(CallError::GaveUp {
                    attempts,
                    status,
                    detail,
                });
            }
            tokio::time::sleep(self.retry.delay(attempts, retry_after)).await;
            // The wait may have outlived the token: take the current one (refreshed if due), and
            // let a 401 after the wait refresh once more before it counts as a refusal.
            if let Some(t) = &self.token {
                bearer = Some(t.bearer().await?);
                refreshed = false;
            }
        }
    }
}

fn accept_for(content_type: &str) -> &'static str {
    if content_type == FHIR_JSON {
        FHIR_JSON
    } else {
        "application/json"
    }
}

/// Builds the HTTP client: rustls with the ring provider and certificate checks, plus an optional
/// extra CA bundle.
pub fn build_client(
    ca_bundle: Option<&std::path::Path>,
    timeout: Duration,
    pool: usize,
) -> Result<reqwest::Client, ClientError> {
    // Installing twice is harmless (the first provider stays); reqwest needs one process-wide.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .connect_timeout(Duration::from_secs(15))
        .pool_max_idle_per_host(pool.max(1))
        .user_agent(concat!("fhirlift/", env!("CARGO_PKG_VERSION")));
    if let Some(path) = ca_bundle {
        let pem = std::fs::read(path).map_err(|source| ClientError::CaRead {
            path: path.to_path_buf(),
            source,
        })?;
        let certs =
            reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| ClientError::CaParse {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?;
        builder = builder.tls_certs_merge(certs);
    }
    builder.build().map_err(|e| ClientError::Build {
        detail: e.to_string(),
    })
}

/// The HTTP client could not be built.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: cannot read the CA bundle: {source}", .path.display())]
    CaRead {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: not a PEM certificate bundle: {detail}", .path.display())]
    CaParse {
        path: std::path::PathBuf,
        detail: String,
    },
    #[error("cannot set up HTTPS: {detail}")]
    Build { detail: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let s = Stats::default();
        for ms in 1..=100 {
            s.record(Duration::from_millis(ms));
        }
        let [p50, p95, p99] = s.percentiles().expect("some");
        assert_eq!(p50, Duration::from_millis(50));
        assert_eq!(p95, Duration::from_millis(95));
        assert_eq!(p99, Duration::from_millis(99));
        assert!(Stats::default().percentiles().is_none());
    }
}
