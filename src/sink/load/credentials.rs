//! Credentials for the token endpoint: from environment variables or a private secrets file, never
//! from the pipeline config, and held in [`Secret`]s that print as `**REDACTED**`.
//!
//! Nothing here may log, print or put into an error message a secret's value.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;

use crate::config::GrantType;

/// Environment variable names.
pub const ENV_CLIENT_ID: &str = "FHIRLIFT_CLIENT_ID";
pub const ENV_CLIENT_SECRET: &str = "FHIRLIFT_CLIENT_SECRET";
pub const ENV_USERNAME: &str = "FHIRLIFT_USERNAME";
pub const ENV_PASSWORD: &str = "FHIRLIFT_PASSWORD";

const REDACTED: &str = "**REDACTED**";

/// A secret string. `Debug` and `Display` never show it; [`Secret::expose`] is the one way out.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Arc<str>);

impl Secret {
    pub fn new(value: impl Into<Arc<str>>) -> Secret {
        Secret(value.into())
    }

    /// The value, for building a request. Never format it into text that leaves the process.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(REDACTED)
    }
}

/// What the token endpoint needs. `username`/`password` only for the password grant.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Credentials {
    pub client_id: Secret,
    pub client_secret: Secret,
    pub username: Option<Secret>,
    pub password: Option<Secret>,
}

/// Why credentials could not be obtained. Names variables and files, never values.
#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error(
        "no credentials: set {} (or target.secrets_file)",
        .missing.join(", ")
    )]
    Missing { missing: Vec<&'static str> },
    #[error(
        "{}: refused: the secrets file is readable by other users (mode {mode:o}); run `chmod 600 {}`",
        .path.display(), .path.display()
    )]
    TooOpen { path: PathBuf, mode: u32 },
    #[error("{}: cannot read the secrets file: {source}", .path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{}{}: not a valid secrets file (TOML with string keys client_id, client_secret, username, password)",
        .path.display(), .line.map(|l| format!(":{l}")).unwrap_or_default()
    )]
    Parse { path: PathBuf, line: Option<usize> },
    #[error("{}: missing {}", .path.display(), .missing.join(", "))]
    Incomplete {
        path: PathBuf,
        missing: Vec<&'static str>,
    },
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SecretsFile {
    client_id: Option<String>,
    client_secret: Option<String>,
    username: Option<String>,
    password: Option<String>,
}

impl Credentials {
    /// From the secrets file when one is configured, else from the environment.
    pub fn load(file: Option<&Path>, grant: GrantType) -> Result<Credentials, CredentialsError> {
        match file {
            Some(path) => Credentials::from_file(path, grant),
            None => Credentials::from_lookup(|k| std::env::var(k).ok(), grant),
        }
    }

    /// From variables found by `lookup` (the environment, or a map in tests). Empty counts as unset.
    pub fn from_lookup(
        lookup: impl Fn(&str) -> Option<String>,
        grant: GrantType,
    ) -> Result<Credentials, CredentialsError> {
        let get = |k: &str| lookup(k).filter(|v| !v.is_empty());
        let found = [
            (ENV_CLIENT_ID, get(ENV_CLIENT_ID)),
            (ENV_CLIENT_SECRET, get(ENV_CLIENT_SECRET)),
            (ENV_USERNAME, get(ENV_USERNAME)),
            (ENV_PASSWORD, get(ENV_PASSWORD)),
        ];
        Credentials::assemble(found, grant).map_err(|missing| CredentialsError::Missing { missing })
    }

    /// From a TOML secrets file, refused when group or others may read it.
    pub fn from_file(path: &Path, grant: GrantType) -> Result<Credentials, CredentialsError> {
        check_private(path)?;
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        // toml's own messages quote the offending line, which may hold a secret: keep only where.
        let parsed: SecretsFile = toml::from_str(&text).map_err(|e| CredentialsError::Parse {
            path: path.to_path_buf(),
            line: e
                .span()
                .map(|s| text[..s.start.min(text.len())].matches('\n').count() + 1),
        })?;
        let nonempty = |v: Option<String>| v.filter(|s| !s.is_empty());
        let found = [
            ("client_id", nonempty(parsed.client_id)),
            ("client_secret", nonempty(parsed.client_secret)),
            ("username", nonempty(parsed.username)),
            ("password", nonempty(parsed.password)),
        ];
        Credentials::assemble(found, grant).map_err(|missing| CredentialsError::Incomplete {
            path: path.to_path_buf(),
            missing,
        })
    }

    /// The four values in order (client id, secret, username, password); user and password are
    /// only required for the password grant.
    fn assemble(
        found: [(&'static str, Option<String>); 4],
        grant: GrantType,
    ) -> Result<Credentials, Vec<&'static str>> {
        let needs_user = grant == GrantType::Password;
        let missing: Vec<&'static str> = found
            .iter()
            .enumerate()
            .filter(|(i, (_, v))| v.is_none() && (*i < 2 || needs_user))
            .map(|(_, (k, _))| *k)
            .collect();
        if !missing.is_empty() {
            return Err(missing);
        }
        let [(_, id), (_, secret), (_, user), (_, pass)] = found;
        Ok(Credentials {
            client_id: Secret::new(id.unwrap_or_default()),
            client_secret: Secret::new(secret.unwrap_or_default()),
            username: user.map(Secret::new),
            password: pass.map(Secret::new),
        })
    }
}

#[cfg(unix)]
fn check_private(path: &Path) -> Result<(), CredentialsError> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| CredentialsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(CredentialsError::TooOpen {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path) -> Result<(), CredentialsError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert_eq!(format!("{s}"), REDACTED);
        assert_eq!(format!("{s:?}"), REDACTED);
        let c = Credentials {
            client_id: Secret::new("id-123"),
            client_secret: Secret::new("hunter2"),
            username: Some(Secret::new("user")),
            password: Some(Secret::new("pw-456")),
        };
        let text = format!("{c:?} {c:#?}");
        for value in ["id-123", "hunter2", "user\"", "pw-456"] {
            assert!(!text.contains(value), "{text}");
        }
    }

    #[test]
    fn environment_names_what_is_missing() {
        let env: HashMap<&str, &str> = [(ENV_CLIENT_ID, "a"), (ENV_CLIENT_SECRET, "b")].into();
        let lookup = |k: &str| env.get(k).map(|v| v.to_string());
        let e = Credentials::from_lookup(lookup, GrantType::Password).expect_err("no user");
        let text = e.to_string();
        assert!(
            text.contains(ENV_USERNAME) && text.contains(ENV_PASSWORD),
            "{text}"
        );
        let c = Credentials::from_lookup(lookup, GrantType::ClientCredentials).expect("cc");
        assert_eq!(c.client_secret.expose(), "b");
        assert!(c.username.is_none());
    }

    #[cfg(unix)]
    #[test]
    fn secrets_file_must_be_private() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.toml");
        std::fs::write(
            &path,
            "client_id = \"id\"\nclient_secret = \"s3cr3t\"\nusername = \"u\"\npassword = \"p4ss\"\n",
        )
        .expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let e = Credentials::from_file(&path, GrantType::Password).expect_err("0644 refused");
        assert!(
            matches!(e, CredentialsError::TooOpen { mode: 0o644, .. }),
            "{e}"
        );
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let c = Credentials::from_file(&path, GrantType::Password).expect("0600 accepted");
        assert_eq!(c.password.as_ref().map(Secret::expose), Some("p4ss"));
    }

    #[cfg(unix)]
    #[test]
    fn parse_errors_do_not_quote_the_file() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("secrets.toml");
        std::fs::write(
            &path,
            "client_id = \"id\"\nclient_secret = s3cr3t-unquoted\n",
        )
        .expect("w");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        let e = Credentials::from_file(&path, GrantType::Password).expect_err("bad toml");
        let text = e.to_string();
        assert!(!text.contains("s3cr3t"), "{text}");
        assert!(text.contains(":2"), "{text}");
    }
}
