//! The sandbox's settings: accounts, token lifetime, faults, seed and store. Validated purely (no
//! I/O) before anything binds or opens a file.

use std::path::PathBuf;

use super::SandboxError;

/// A secret string whose `Debug` never shows the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }
    /// The value, for comparisons and for printing the sandbox's own demo credentials.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("**REDACTED**")
    }
}

impl From<&str> for Secret {
    fn from(s: &str) -> Secret {
        Secret(s.to_string())
    }
}

/// One center's account: the OAuth2 client and service user it is given, and the center
/// numbers (CCNs) its tokens may submit for.
#[derive(Clone, Debug)]
pub struct Account {
    pub client_id: String,
    pub client_secret: Secret,
    pub username: String,
    pub password: Secret,
    /// Scopes a token may be issued for; the first one is the default.
    pub scopes: Vec<String>,
    /// Five-digit center numbers, e.g. `12001`.
    pub ccns: Vec<String>,
}

impl Default for Account {
    /// The documented demo account: `fhirlift-sandbox` / `sandbox-secret`, user `sandbox-user` /
    /// `sandbox-password`, scope `api_cibmtr_fhir_ehr_client`, CCN `12001`.
    fn default() -> Account {
        Account {
            client_id: "fhirlift-sandbox".into(),
            client_secret: "sandbox-secret".into(),
            username: "sandbox-user".into(),
            password: "sandbox-password".into(),
            scopes: vec!["api_cibmtr_fhir_ehr_client".into()],
            ccns: vec!["12001".into()],
        }
    }
}

/// Fault injection. Rates are probabilities in `[0, 1]`, drawn from one RNG seeded with
/// [`SandboxConfig::seed`], in arrival order. `Default` injects nothing (and `Retry-After: 1`).
#[derive(Clone, Debug)]
pub struct Faults {
    /// Added to every faulted request before it is handled.
    pub latency_ms: u64,
    /// Uniform extra latency in `0..=jitter_ms`.
    pub jitter_ms: u64,
    /// Share of requests answered 500 or 503 without being processed.
    pub error_rate: f64,
    /// Share of requests answered 429 with `Retry-After`, without being processed.
    pub throttle_rate: f64,
    /// `Retry-After` seconds on a 429.
    pub retry_after_secs: u64,
    /// Share of connections closed without an answer; nothing is processed.
    pub drop_rate: f64,
    /// Share of requests processed (and stored) whose answer is then lost: the connection is cut.
    pub lost_answer_rate: f64,
    /// Whether faults apply to the token endpoint too (by default it is exempt, so that fault
    /// tests exercise the API client rather than the token cache).
    pub include_token_endpoint: bool,
}

impl Default for Faults {
    fn default() -> Faults {
        Faults {
            latency_ms: 0,
            jitter_ms: 0,
            error_rate: 0.0,
            throttle_rate: 0.0,
            retry_after_secs: 1,
            drop_rate: 0.0,
            lost_answer_rate: 0.0,
            include_token_endpoint: false,
        }
    }
}

impl Faults {
    /// Whether any fault (latency included) is configured.
    pub fn any(&self) -> bool {
        self.latency_ms > 0
            || self.jitter_ms > 0
            || self.error_rate > 0.0
            || self.throttle_rate > 0.0
            || self.drop_rate > 0.0
            || self.lost_answer_rate > 0.0
    }
}

/// Everything the sandbox needs to run. `Default` is the documented default.
#[derive(Clone, Debug)]
pub struct SandboxConfig {
    pub accounts: Vec<Account>,
    /// `expires_in` of issued tokens, in seconds (0 issues tokens that are already expired).
    pub token_ttl_secs: u64,
    pub faults: Faults,
    /// Seed of the fault RNG: the same seed and the same request order give the same faults.
    pub seed: u64,
    /// SQLite file; `None` keeps everything in memory.
    pub db: Option<PathBuf>,
    /// Largest transaction Bundle accepted.
    pub max_bundle_entries: usize,
    /// Page size when a search has no `_count`.
    pub default_page_size: usize,
    /// Largest `_count` honoured (larger values are clamped).
    pub max_page_size: usize,
}

impl Default for SandboxConfig {
    fn default() -> SandboxConfig {
        SandboxConfig {
            accounts: vec![Account::default()],
            token_ttl_secs: 1800,
            faults: Faults::default(),
            seed: 0,
            db: None,
            max_bundle_entries: 50,
            default_page_size: 20,
            max_page_size: 1000,
        }
    }
}

fn is_ccn(s: &str) -> bool {
    s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit())
}

impl SandboxConfig {
    /// Checks the settings without touching the network or the disk.
    pub fn validate(&self) -> Result<(), SandboxError> {
        let bad =
            |field: &'static str, reason: String| SandboxError::InvalidConfig { field, reason };
        if self.accounts.is_empty() {
            return Err(bad("accounts", "at least one account is needed".into()));
        }
        for a in &self.accounts {
            if a.client_id.is_empty() || a.username.is_empty() {
                return Err(bad(
                    "accounts",
                    "client id and username must not be empty".into(),
                ));
            }
            if a.ccns.is_empty() {
                return Err(bad(
                    "ccn",
                    format!("account `{}` has no center number", a.client_id),
                ));
            }
            if let Some(c) = a.ccns.iter().find(|c| !is_ccn(c)) {
                return Err(bad(
                    "ccn",
                    format!("`{c}` is not a five-digit center number"),
                ));
            }
            if a.scopes.is_empty() {
                return Err(bad("scope", "at least one scope is needed".into()));
            }
        }
        let f = &self.faults;
        for (name, v) in [
            ("error-rate", f.error_rate),
            ("throttle-rate", f.throttle_rate),
            ("drop-rate", f.drop_rate),
            ("lost-answer-rate", f.lost_answer_rate),
        ] {
            if !(0.0..=1.0).contains(&v) {
                return Err(bad(
                    "faults",
                    format!("{name} must be between 0 and 1, got {v}"),
                ));
            }
        }
        if self.max_bundle_entries == 0 || self.default_page_size == 0 || self.max_page_size == 0 {
            return Err(bad(
                "limits",
                "bundle and page sizes must be positive".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests fail loudly")]
mod tests {
    use super::*;

    #[test]
    fn default_is_valid_and_documented() {
        let c = SandboxConfig::default();
        c.validate().unwrap();
        assert_eq!(c.accounts[0].client_id, "fhirlift-sandbox");
        assert_eq!(c.accounts[0].ccns, vec!["12001".to_string()]);
        assert_eq!(c.token_ttl_secs, 1800);
        assert_eq!(c.max_bundle_entries, 50);
    }

    #[test]
    fn rejects_bad_rates_and_ccns() {
        let mut c = SandboxConfig::default();
        c.faults.drop_rate = 1.5;
        assert!(c.validate().is_err());
        let mut c = SandboxConfig::default();
        c.accounts[0].ccns = vec!["1200".into()];
        assert!(c.validate().is_err());
    }

    #[test]
    fn secrets_do_not_debug_print() {
        let a = Account::default();
        let s = format!("{a:?}");
        assert!(!s.contains("sandbox-secret"));
        assert!(!s.contains("sandbox-password"));
    }
}
