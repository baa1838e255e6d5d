//! Where the loader sends: the environment presets, URL joining, and the rule that plain `http://`
//! is only for loopback addresses.
//!
//! Resolution is pure (no network, no files): it turns the config's `[target]` plus the run's
//! overrides into concrete endpoint URLs. Starting the embedded sandbox is not done here.

use std::net::IpAddr;

use url::{Host, Url};

use crate::config::{TargetConfig, TargetKind};

/// A preset environment from the implementation guide.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Preset {
    pub token_url: &'static str,
    pub base_url: &'static str,
}

/// The IG's `test` environment.
pub const TEST: Preset = Preset {
    token_url: "https://oktapreview.nmdp.org/oauth2/ausaexcazhLhxKnJs0h7/v1/token",
    base_url: "https://dev-api.nmdp.org/cibmtr-fhir-backend-exttest/v1",
};

/// The IG's `production-test` environment (production client workflows, non-production data).
pub const PRODUCTION_TEST: Preset = Preset {
    token_url: "https://oktapreview.nmdp.org/oauth2/ausaexcazhLhxKnJs0h7/v1/token",
    base_url: "https://int-api.nmdp.org/cibmtr-fhir-backend/v1",
};

/// The IG's `production` environment.
pub const PRODUCTION: Preset = Preset {
    token_url: "https://okta.nmdp.org/oauth2/aus3ck6q30qmOdpMb1t7/v1/token",
    base_url: "https://api.nmdp.org/cibmtr-fhir-backend/v1",
};

/// The preset for a kind, if it has one.
pub fn preset(kind: TargetKind) -> Option<Preset> {
    match kind {
        TargetKind::Test => Some(TEST),
        TargetKind::ProductionTest => Some(PRODUCTION_TEST),
        TargetKind::Production => Some(PRODUCTION),
        TargetKind::Sandbox | TargetKind::Custom | TargetKind::Fhir => None,
    }
}

/// The run's command-line overrides of the config's `[target]`.
#[derive(Clone, Debug, Default)]
pub struct TargetOverrides {
    pub kind: Option<TargetKind>,
    pub base_url: Option<String>,
    pub token_url: Option<String>,
}

/// A target that cannot be used as configured.
#[derive(Debug, thiserror::Error)]
pub enum TargetError {
    #[error("target {kind}: a base URL is required (target.base_url or --base-url)")]
    MissingBaseUrl { kind: &'static str },
    #[error("target {kind}: a token URL is required (target.token_url or --token-url)")]
    MissingTokenUrl { kind: &'static str },
    #[error("{what} {url:?} is not a valid URL: {source}")]
    InvalidUrl {
        what: &'static str,
        url: String,
        #[source]
        source: url::ParseError,
    },
    #[error(
        "{what} {url} uses plain http:// to a non-loopback host; use https:// (plain http is only allowed for 127.0.0.1, ::1 and localhost)"
    )]
    PlainHttp { what: &'static str, url: String },
    #[error("{what} {url} must use https:// (or http:// to a loopback address)")]
    Scheme { what: &'static str, url: String },
}

/// The endpoints of one target, resolved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoints {
    pub kind: TargetKind,
    /// `PUT /CRID`; `None` for a generic FHIR server.
    pub crid_url: Option<Url>,
    /// The FHIR base: `{base}/r4`, or the given base for a generic FHIR server.
    pub fhir_base: Url,
    /// The OAuth2 token endpoint; `None` when the target needs no authentication.
    pub token_url: Option<Url>,
}

impl Endpoints {
    /// Endpoints of a CIBMTR-style service at `base` (FHIR at `{base}/r4`, CRID at `{base}/CRID`).
    pub fn cibmtr(kind: TargetKind, base: &Url, token_url: Option<Url>) -> Endpoints {
        Endpoints {
            kind,
            crid_url: Some(join(base, &["CRID"])),
            fhir_base: join(base, &["r4"]),
            token_url,
        }
    }

    /// `{fhir_base}/{segments…}`.
    pub fn fhir(&self, segments: &[&str]) -> Url {
        join(&self.fhir_base, segments)
    }
}

/// Resolves a non-sandbox target. The sandbox's URLs exist only once it is started; see
/// [`Endpoints::cibmtr`].
pub fn resolve(config: &TargetConfig, over: &TargetOverrides) -> Result<Endpoints, TargetError> {
    let kind = over.kind.unwrap_or(config.kind);
    let name = kind_name(kind);
    let base_text = over.base_url.clone().or_else(|| config.base_url.clone());
    let token_text = over.token_url.clone().or_else(|| config.token_url.clone());
    let (base_text, token_text) = match preset(kind) {
        Some(p) => (
            base_text.unwrap_or_else(|| p.base_url.to_string()),
            Some(token_text.unwrap_or_else(|| p.token_url.to_string())),
        ),
        None => (
            base_text.ok_or(TargetError::MissingBaseUrl { kind: name })?,
            token_text,
        ),
    };
    let base = checked_url("base URL", &base_text)?;
    let token = token_text
        .map(|t| checked_url("token URL", &t))
        .transpose()?;
    match kind {
        TargetKind::Fhir => Ok(Endpoints {
            kind,
            crid_url: None,
            fhir_base: join(&base, &[]),
            token_url: token,
        }),
        TargetKind::Custom if token.is_none() && config.grant != crate::config::GrantType::None => {
            Err(TargetError::MissingTokenUrl { kind: name })
        }
        _ => Ok(Endpoints::cibmtr(kind, &base, token)),
    }
}

/// The kind as the config spells it.
pub fn kind_name(kind: TargetKind) -> &'static str {
    match kind {
        TargetKind::Sandbox => "sandbox",
        TargetKind::Test => "test",
        TargetKind::ProductionTest => "production-test",
        TargetKind::Production => "production",
        TargetKind::Custom => "custom",
        TargetKind::Fhir => "fhir",
    }
}

/// Parses a URL and applies the transport rule: https anywhere, http only to loopback.
pub fn checked_url(what: &'static str, text: &str) -> Result<Url, TargetError> {
    let url = Url::parse(text.trim()).map_err(|source| TargetError::InvalidUrl {
        what,
        url: text.to_string(),
        source,
    })?;
    match url.scheme() {
        "https" => Ok(url),
        "http" if is_loopback(&url) => Ok(url),
        "http" => Err(TargetError::PlainHttp {
            what,
            url: url.to_string(),
        }),
        _ => Err(TargetError::Scheme {
            what,
            url: url.to_string(),
        }),
    }
}

/// Whether a URL's host is a loopback address.
pub fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(Host::Ipv4(ip)) => IpAddr::V4(ip).is_loopback(),
        Some(Host::Ipv6(ip)) => IpAddr::V6(ip).is_loopback(),
        Some(Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        None => false,
    }
}

/// Appends path segments to a base URL so that no `//` appears, whatever slashes the base and the
/// segments carry (the IG prints a double slash for production). Query and fragment are dropped.
pub fn join(base: &Url, segments: &[&str]) -> Url {
    let mut url = base.clone();
    url.set_query(None);
    url.set_fragment(None);
    let parts: Vec<String> = base
        .path()
        .split('/')
        .chain(segments.iter().flat_map(|s| s.split('/')))
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
    url.set_path(&format!("/{}", parts.join("/")));
    url
}

#[cfg(test)]
mod tests {
    use super::*;

    fn u(s: &str) -> Url {
        Url::parse(s).expect("test url")
    }

    #[test]
    fn joining_never_doubles_slashes() {
        let base = u("https://api.nmdp.org/cibmtr-fhir-backend/v1/");
        assert_eq!(
            join(&base, &["/r4/", "Patient"]).as_str(),
            "https://api.nmdp.org/cibmtr-fhir-backend/v1/r4/Patient"
        );
        let typo = u("https://api.nmdp.org//cibmtr-fhir-backend/v1//");
        assert_eq!(
            join(&typo, &["CRID"]).as_str(),
            "https://api.nmdp.org/cibmtr-fhir-backend/v1/CRID"
        );
        assert_eq!(
            join(&u("http://127.0.0.1:8080"), &["r4"]).as_str(),
            "http://127.0.0.1:8080/r4"
        );
    }

    #[test]
    fn plain_http_only_for_loopback() {
        assert!(checked_url("base URL", "http://127.0.0.1:9/x").is_ok());
        assert!(checked_url("base URL", "http://[::1]:9/x").is_ok());
        assert!(checked_url("base URL", "http://localhost:9/x").is_ok());
        assert!(checked_url("base URL", "https://example.org/x").is_ok());
        let e = checked_url("base URL", "http://example.org/x").expect_err("remote http");
        assert!(matches!(e, TargetError::PlainHttp { .. }), "{e}");
        assert!(checked_url("base URL", "http://10.0.0.1/x").is_err());
        assert!(checked_url("base URL", "ftp://127.0.0.1/x").is_err());
    }

    #[test]
    fn presets_and_overrides() {
        let mut cfg = TargetConfig {
            kind: TargetKind::Production,
            ..TargetConfig::default()
        };
        let e = resolve(&cfg, &TargetOverrides::default()).expect("preset");
        assert_eq!(
            e.fhir(&["Patient"]).as_str(),
            "https://api.nmdp.org/cibmtr-fhir-backend/v1/r4/Patient"
        );
        assert_eq!(
            e.crid_url.as_ref().map(Url::as_str),
            Some("https://api.nmdp.org/cibmtr-fhir-backend/v1/CRID")
        );
        assert_eq!(
            e.token_url.as_ref().map(Url::as_str),
            Some(PRODUCTION.token_url)
        );

        cfg.kind = TargetKind::Custom;
        assert!(matches!(
            resolve(&cfg, &TargetOverrides::default()),
            Err(TargetError::MissingBaseUrl { .. })
        ));
        let over = TargetOverrides {
            kind: Some(TargetKind::Fhir),
            base_url: Some("http://127.0.0.1:8080/fhir/".into()),
            token_url: None,
        };
        let e = resolve(&cfg, &over).expect("fhir");
        assert_eq!(e.crid_url, None);
        assert_eq!(
            e.fhir(&["Observation"]).as_str(),
            "http://127.0.0.1:8080/fhir/Observation"
        );
    }
}
