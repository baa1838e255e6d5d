//! `fhirlift sandbox`: serve the local CIBMTR sandbox until interrupted, or export its store with
//! `--dump`. Only flag handling and printing live here; the server is [`crate::sandbox`].

use std::path::PathBuf;

use super::{CommandResult, Outcome};
use crate::sandbox::{self, Account, Faults, SandboxConfig, Secret};

#[derive(Debug, clap::Args)]
pub struct SandboxArgs {
    // Boxed: the flags are many, and the command enum should stay small.
    #[command(flatten)]
    pub options: Box<SandboxOptions>,
}

#[derive(Debug, clap::Args)]
pub struct SandboxOptions {
    /// Address to listen on. Only loopback unless you say otherwise.
    #[arg(long, default_value = "127.0.0.1:8787", value_name = "HOST:PORT")]
    pub addr: String,
    /// SQLite store; without it everything is kept in memory and lost on exit.
    #[arg(long, value_name = "PATH")]
    pub db: Option<PathBuf>,
    /// Export the store given by --db as NDJSON files (one per resource type) into DIR and exit.
    #[arg(long, value_name = "DIR", requires = "db")]
    pub dump: Option<PathBuf>,
    /// OAuth2 client id accepted by the token endpoint.
    #[arg(long, default_value = "fhirlift-sandbox")]
    pub client_id: String,
    /// OAuth2 client secret.
    #[arg(
        long,
        default_value = "sandbox-secret",
        env = "FHIRLIFT_SANDBOX_CLIENT_SECRET",
        hide_env_values = true
    )]
    pub client_secret: String,
    /// Service-account username for the password grant.
    #[arg(long, default_value = "sandbox-user")]
    pub username: String,
    /// Service-account password.
    #[arg(
        long,
        default_value = "sandbox-password",
        env = "FHIRLIFT_SANDBOX_PASSWORD",
        hide_env_values = true
    )]
    pub password: String,
    /// Scope tokens are issued for (repeatable; the first is the default).
    #[arg(long = "scope", default_value = "api_cibmtr_fhir_ehr_client")]
    pub scopes: Vec<String>,
    /// Center number (CCN) the account may submit for (repeatable).
    #[arg(long = "ccn", default_value = "12001")]
    pub ccns: Vec<String>,
    /// Token lifetime (`expires_in`) in seconds.
    #[arg(long, default_value_t = 1800, value_name = "SECONDS")]
    pub token_ttl: u64,
    /// Seed of the fault-injection RNG.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Latency added to every API request, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub latency_ms: u64,
    /// Extra random latency up to this many milliseconds.
    #[arg(long, default_value_t = 0)]
    pub jitter_ms: u64,
    /// Share (0..1) of API requests answered 500/503 without processing.
    #[arg(long, default_value_t = 0.0)]
    pub error_rate: f64,
    /// Share (0..1) of API requests answered 429 with Retry-After.
    #[arg(long, default_value_t = 0.0)]
    pub throttle_rate: f64,
    /// Retry-After seconds sent with a 429.
    #[arg(long, default_value_t = 1)]
    pub retry_after: u64,
    /// Share (0..1) of API requests whose connection is closed without an answer (nothing stored).
    #[arg(long, default_value_t = 0.0)]
    pub drop_rate: f64,
    /// Share (0..1) of API requests processed and stored whose answer is then lost.
    #[arg(long, default_value_t = 0.0)]
    pub lost_answer_rate: f64,
    /// Apply the faults to the token endpoint too (it is exempt by default).
    #[arg(long)]
    pub fault_token_endpoint: bool,
}

impl SandboxOptions {
    fn config(&self) -> SandboxConfig {
        SandboxConfig {
            accounts: vec![Account {
                client_id: self.client_id.clone(),
                client_secret: Secret::new(self.client_secret.clone()),
                username: self.username.clone(),
                password: Secret::new(self.password.clone()),
                scopes: self.scopes.clone(),
                ccns: self.ccns.clone(),
            }],
            token_ttl_secs: self.token_ttl,
            faults: Faults {
                latency_ms: self.latency_ms,
                jitter_ms: self.jitter_ms,
                error_rate: self.error_rate,
                throttle_rate: self.throttle_rate,
                retry_after_secs: self.retry_after,
                drop_rate: self.drop_rate,
                lost_answer_rate: self.lost_answer_rate,
                include_token_endpoint: self.fault_token_endpoint,
            },
            seed: self.seed,
            db: self.db.clone(),
            ..SandboxConfig::default()
        }
    }
}

pub fn run(args: SandboxArgs) -> CommandResult {
    let args = *args.options;
    if let (Some(dir), Some(db)) = (&args.dump, &args.db) {
        if !db.is_file() {
            return Err(format!("no sandbox store at {}", db.display()).into());
        }
        let counts = sandbox::dump_store(db, dir)?;
        for (t, n) in &counts {
            println!(
                "{n:>8} {t} -> {}",
                dir.join(format!("{t}.ndjson")).display()
            );
        }
        if counts.is_empty() {
            println!("the store holds no resources");
        }
        return Ok(Outcome::Success);
    }
    let config = args.config();
    config.validate()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.addr)
            .await
            .map_err(|source| sandbox::SandboxError::Bind {
                addr: args.addr.clone(),
                source,
            })?;
        let addr = listener.local_addr()?;
        println!("fhirlift sandbox listening");
        println!("  base URL:      http://{addr}");
        println!("  token URL:     http://{addr}{}", sandbox::TOKEN_PATH);
        println!("  client id:     {}", args.client_id);
        println!("  client secret: {}", args.client_secret);
        println!("  username:      {}", args.username);
        println!("  password:      {}", args.password);
        println!("  scope:         {}", args.scopes.join(" "));
        println!("  CCNs:          {}", args.ccns.join(", "));
        match &args.db {
            Some(db) => println!("  store:         {}", db.display()),
            None => println!("  store:         memory (lost on exit)"),
        }
        println!("Press Ctrl-C to stop.");
        sandbox::serve(config, listener, async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(())
    })?;
    Ok(Outcome::Success)
}
