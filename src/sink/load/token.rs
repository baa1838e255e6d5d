//! The OAuth2 token manager: password grant (client authenticated with HTTP Basic) or client
//! credentials; one cached token shared by every worker, refreshed shortly before `expires_in`
//! runs out, one refresh at a time (the token endpoint rate-limits), and a forced refresh when the
//! API answers 401 to a token that looked valid.
//!
//! It must never log or put in an error a token, a secret or a password.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime};

use serde::Deserialize;
use url::Url;

use super::credentials::{Credentials, Secret};
use super::retry::{RetryPolicy, parse_retry_after};
use crate::config::GrantType;

/// A token and which refresh produced it, so a 401 can tell "my token is stale" from "someone
/// already refreshed it".
#[derive(Clone, Debug)]
pub struct BearerToken {
    pub value: Secret,
    pub generation: u64,
}

/// The token endpoint refused or could not be reached: the run cannot go on.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token endpoint {url} refused the credentials (HTTP {status}{})", .error.as_ref().map(|e| format!(", {e}")).unwrap_or_default())]
    Rejected {
        url: String,
        status: u16,
        /// The OAuth2 `error` code (e.g. `invalid_grant`), never a description that could echo input.
        error: Option<String>,
    },
    #[error("token endpoint {url} unreachable after {attempts} attempts: {detail}")]
    Unreachable {
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("token endpoint {url} answered without a usable token: {detail}")]
    BadResponse { url: String, detail: String },
    #[error("the target refused a freshly issued token (HTTP 401): the account may lack access")]
    Unauthorized,
    #[error("the target refused access (HTTP 403){}", .detail.as_ref().map(|d| format!(": {d}")).unwrap_or_default())]
    Forbidden { detail: Option<String> },
}

struct Cached {
    value: Secret,
    refresh_at: Instant,
    generation: u64,
}

/// The shared token cache. Cheap to share behind an `Arc`.
pub struct TokenManager {
    http: reqwest::Client,
    url: Url,
    grant: GrantType,
    credentials: Credentials,
    scope: Option<String>,
    retry: RetryPolicy,
    state: tokio::sync::Mutex<Option<Cached>>,
    requests: AtomicU32,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: Option<String>,
    expires_in: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct OAuthError {
    error: Option<String>,
}

impl TokenManager {
    pub fn new(
        http: reqwest::Client,
        url: Url,
        grant: GrantType,
        credentials: Credentials,
        scope: Option<String>,
        retry: RetryPolicy,
    ) -> TokenManager {
        TokenManager {
            http,
            url,
            grant,
            credentials,
            scope,
            retry,
            state: tokio::sync::Mutex::new(None),
            requests: AtomicU32::new(0),
        }
    }

    /// How many token requests were made (for the run summary and tests).
    pub fn requests(&self) -> u32 {
        self.requests.load(Ordering::Relaxed)
    }

    /// The current token, fetching or refreshing it when needed. Workers calling at once wait for
    /// one refresh instead of each asking the token endpoint.
    pub async fn bearer(&self) -> Result<BearerToken, AuthError> {
        let mut state = self.state.lock().await;
        if let Some(c) = state.as_ref()
            && Instant::now() < c.refresh_at
        {
            return Ok(BearerToken {
                value: c.value.clone(),
                generation: c.generation,
            });
        }
        self.refresh_locked(&mut state).await
    }

    /// Called after a 401 with the token that was refused: refreshes unless another worker has
    /// already replaced that token.
    pub async fn refresh_after_rejection(&self, refused: u64) -> Result<BearerToken, AuthError> {
        let mut state = self.state.lock().await;
        if let Some(c) = state.as_ref()
            && c.generation != refused
            && Instant::now() < c.refresh_at
        {
            return Ok(BearerToken {
                value: c.value.clone(),
                generation: c.generation,
            });
        }
        self.refresh_locked(&mut state).await
    }

    async fn refresh_locked(&self, state: &mut Option<Cached>) -> Result<BearerToken, AuthError> {
        let (value, lifetime) = self.fetch().await?;
        let generation = state.as_ref().map_or(1, |c| c.generation + 1);
        // Refresh a little before expiry so a token never runs out mid-request: a fifth of the
        // lifetime, at most a minute (30-minute tokens refresh after 29).
        let margin = (lifetime / 5).min(Duration::from_secs(60));
        *state = Some(Cached {
            value: value.clone(),
            refresh_at: Instant::now() + lifetime.saturating_sub(margin),
            generation,
        });
        tracing::debug!(
            generation,
            lifetime_s = lifetime.as_secs(),
            "Token obtained."
        );
        Ok(BearerToken { value, generation })
    }

    async fn fetch(&self) -> Result<(Secret, Duration), AuthError> {
        let url = self.url.to_string();
        let mut form: Vec<(&str, &str)> = Vec::new();
        match self.grant {
            GrantType::ClientCredentials => form.push(("grant_type", "client_credentials")),
            _ => {
                form.push(("grant_type", "password"));
                if let Some(u) = &self.credentials.username {
                    form.push(("username", u.expose()));
                }
                if let Some(p) = &self.credentials.password {
                    form.push(("password", p.expose()));
                }
            }
        }
        if let Some(scope) = &self.scope {
            form.push(("scope", scope));
        }
        let mut attempts = 0;
        loop {
            attempts += 1;
            self.requests.fetch_add(1, Ordering::Relaxed);
            let sent = self
                .http
                .post(self.url.clone())
                .basic_auth(
                    self.credentials.client_id.expose(),
                    Some(self.credentials.client_secret.expose()),
                )
                .header(reqwest::header::ACCEPT, "application/json")
                .form(&form)
                .send()
                .await;
            let (retry_after, detail) = match sent {
                Ok(resp) => {
                    let status = resp.status().as_u16();
                    let retry_after = resp
                        .headers()
                        .get(reqwest::header::RETRY_AFTER)
                        .and_then(|v| v.to_str().ok())
                        .and_then(|v| parse_retry_after(v, SystemTime::now()));
                    let body = resp.bytes().await.unwrap_or_default();
                    if (200..300).contains(&status) {
                        return parse_token(&url, &body);
                    }
                    if !RetryPolicy::status_is_retryable(status) {
                        let error = serde_json::from_slice::<OAuthError>(&body)
                            .ok()
                            .and_then(|e| e.error)
                            .filter(|e| e.len() < 64 && e.bytes().all(|b| b.is_ascii_graphic()));
                        return Err(AuthError::Rejected { url, status, error });
                    }
                    (retry_after, format!("HTTP {status}"))
                }
                Err(e) => (None, e.without_url().to_string()),
            };
            if !self.retry.may_retry(attempts) {
                return Err(AuthError::Unreachable {
                    url,
                    attempts,
                    detail,
                });
            }
            tokio::time::sleep(self.retry.delay(attempts, retry_after)).await;
        }
    }
}

fn parse_token(url: &str, body: &[u8]) -> Result<(Secret, Duration), AuthError> {
    let bad = |detail: &str| AuthError::BadResponse {
        url: url.to_string(),
        detail: detail.to_string(),
    };
    let t: TokenResponse = serde_json::from_slice(body).map_err(|_| bad("not JSON"))?;
    let token = t
        .access_token
        .filter(|t| !t.is_empty())
        .ok_or_else(|| bad("no access_token"))?;
    // Trust `expires_in`; Okta sends a number, some servers a string. Without one, assume five
    // minutes so the token is refreshed early rather than used stale.
    let secs = match t.expires_in {
        Some(serde_json::Value::Number(n)) => n.to_string().parse::<f64>().ok(),
        Some(serde_json::Value::String(s)) => s.trim().parse::<f64>().ok(),
        _ => None,
    }
    .filter(|s| s.is_finite() && *s > 0.0)
    .unwrap_or(300.0);
    Ok((
        Secret::new(token),
        Duration::from_secs_f64(secs.min(86_400.0 * 7.0)),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_responses() {
        let (t, d) = parse_token(
            "u",
            br#"{"token_type":"Bearer","expires_in":1800,"access_token":"abc","scope":"x"}"#,
        )
        .expect("token");
        assert_eq!(t.expose(), "abc");
        assert_eq!(d, Duration::from_secs(1800));
        let (_, d) = parse_token("u", br#"{"expires_in":"2","access_token":"abc"}"#).expect("t");
        assert_eq!(d, Duration::from_secs(2));
        assert!(parse_token("u", br#"{"expires_in":5}"#).is_err());
        assert!(parse_token("u", b"<html>").is_err());
    }
}
