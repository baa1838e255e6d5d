//! The sandbox: a local server implementing the CIBMTR Direct FHIR contract (token endpoint,
//! `PUT /CRID`, FHIR R4 under `/r4`), with real SQLite storage and reproducible fault injection.
//!
//! It is the default target of `fhirlift run`, the backbone of the end-to-end tests and a rehearsal
//! tool for centers. It must not depend on the readers or the mapping stage, must never bind
//! anywhere it was not asked to, and must never log patient values or secrets above TRACE.
//!
//! Two ways to run it:
//! - [`serve`] on a listener inside the caller's tokio runtime (async callers);
//! - [`SandboxHandle::start`] on its own thread and runtime (sync callers and tests).

mod config;
mod crid;
mod fhir;
mod server;
mod stats;
mod store;

use std::net::SocketAddr;
use std::sync::Arc;

pub use config::{Account, Faults, SandboxConfig, Secret};
pub use stats::Stats;
pub use store::{StoreError, dump_store};

/// The path of the token endpoint, relative to the server address.
pub const TOKEN_PATH: &str = "/oauth2/token";
/// The security label system of a transplant center (`rc_NNNNN` codes).
pub const CENTER_SYSTEM: &str = "http://cibmtr.org/codesystem/transplant-center";
/// The published profiles' spelling of the same code system; accepted too.
pub const CENTER_SYSTEM_TERMINOLOGY: &str =
    "http://terminology.cibmtr.org/codesystem/transplant-center";
/// The CRID identifier system used by working clients.
pub const CRID_SYSTEM: &str = "http://cibmtr.org/identifier/CRID";
/// The published profiles' spelling of the CRID identifier system; accepted too.
pub const CRID_SYSTEM_TERMINOLOGY: &str = "http://terminology.cibmtr.org/identifier/CRID";

/// Why the sandbox could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error("invalid sandbox setting `{field}`: {reason}")]
    InvalidConfig { field: &'static str, reason: String },
    #[error("cannot listen on {addr}")]
    Bind {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("sandbox store")]
    Store(#[from] StoreError),
    #[error("cannot start the sandbox runtime")]
    Runtime(#[source] std::io::Error),
    #[error("the sandbox thread stopped before it was ready")]
    ThreadGone,
}

/// Serves the sandbox on `listener` until `shutdown` completes. Opens (or creates) the store
/// named by `config.db`, or an in-memory one.
pub async fn serve(
    config: SandboxConfig,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), SandboxError> {
    let addr = listener.local_addr().map_err(SandboxError::Runtime)?;
    let state = server::State::new(config, addr)?;
    tracing::info!(addr = %addr, "Sandbox started");
    server::accept_loop(Arc::new(state), listener, shutdown).await;
    Ok(())
}

/// A sandbox running on its own thread and tokio runtime; stops on [`SandboxHandle::shutdown`]
/// or when dropped.
pub struct SandboxHandle {
    addr: SocketAddr,
    state: Arc<server::State>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl std::fmt::Debug for SandboxHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SandboxHandle")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl SandboxHandle {
    /// Binds `addr` (e.g. `127.0.0.1:0` for an ephemeral port), opens the store and starts serving.
    /// Returns once the server accepts connections.
    pub fn start(config: SandboxConfig, addr: &str) -> Result<SandboxHandle, SandboxError> {
        config.validate()?;
        let std_listener =
            std::net::TcpListener::bind(addr).map_err(|source| SandboxError::Bind {
                addr: addr.to_string(),
                source,
            })?;
        std_listener
            .set_nonblocking(true)
            .map_err(SandboxError::Runtime)?;
        let local = std_listener.local_addr().map_err(SandboxError::Runtime)?;
        let state = Arc::new(server::State::new(config, local)?);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("sandbox")
            .enable_all()
            .build()
            .map_err(SandboxError::Runtime)?;
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), std::io::Error>>();
        let thread_state = state.clone();
        let thread = std::thread::Builder::new()
            .name("sandbox".into())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = match tokio::net::TcpListener::from_std(std_listener) {
                        Ok(l) => {
                            let _ = ready_tx.send(Ok(()));
                            l
                        }
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    server::accept_loop(thread_state, listener, async {
                        let _ = stop_rx.await;
                    })
                    .await;
                });
                // Connection tasks still running (keep-alive clients) are dropped with the runtime.
                runtime.shutdown_background();
            })
            .map_err(SandboxError::Runtime)?;
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(SandboxError::Runtime(e)),
            Err(_) => return Err(SandboxError::ThreadGone),
        }
        tracing::info!(addr = %local, "Sandbox started");
        Ok(SandboxHandle {
            addr: local,
            state,
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The socket address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL (`http://127.0.0.1:PORT`): `PUT {base}/CRID`, FHIR under `{base}/r4`.
    pub fn base_url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The token endpoint (`http://127.0.0.1:PORT/oauth2/token`).
    pub fn token_url(&self) -> String {
        format!("http://{}{}", self.addr, TOKEN_PATH)
    }

    /// What the server has seen and stored so far (same content as `GET /_sandbox/stats`).
    pub fn stats(&self) -> Stats {
        self.state.stats()
    }

    /// Stops accepting connections, drops open ones and waits for the server thread.
    pub fn shutdown(mut self) {
        self.stop_now();
    }

    fn stop_now(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for SandboxHandle {
    fn drop(&mut self) {
        self.stop_now();
    }
}
