//! The sandbox's HTTP side: the accept loop, routing, OAuth2 tokens, `PUT /CRID`, fault
//! injection and request counting.
//!
//! Connections are served by hyper directly (HTTP/1.1, keep-alive) so that a fault can close a
//! connection without any answer: the service returns an error, hyper drops the connection and
//! the client sees the socket close. Nothing here logs request content; per-request logs are TRACE.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use super::config::SandboxConfig;
use super::crid::{CridRequest, lookup_or_assign};
use super::fhir::{self, Ctx, FhirError, FhirOk};
use super::stats::{Counters, Stats};
use super::store::{Store, lock};
use super::{SandboxError, TOKEN_PATH};

type Resp = Response<Full<Bytes>>;

/// Largest request body read (a 50-entry Bundle is far below this).
const MAX_BODY: usize = 16 * 1024 * 1024;
/// Random bytes per token; base64url makes them 1024 characters, like the long tokens real
/// Okta deployments issue, so clients are exercised with them.
const TOKEN_BYTES: usize = 768;

const FHIR_JSON: &str = "application/fhir+json;charset=utf-8";
const JSON: &str = "application/json;charset=utf-8";

/// The connection must be closed without an answer.
#[derive(Debug)]
struct Cut;

impl std::fmt::Display for Cut {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection cut by fault injection")
    }
}

impl std::error::Error for Cut {}

struct Grant {
    expires: Instant,
    ccns: Arc<Vec<String>>,
}

pub struct State {
    config: SandboxConfig,
    base: String,
    store: Mutex<Store>,
    tokens: Mutex<HashMap<String, Grant>>,
    rng: Mutex<StdRng>,
    counters: Counters,
}

impl State {
    pub fn new(config: SandboxConfig, addr: SocketAddr) -> Result<State, SandboxError> {
        config.validate()?;
        let store = Store::open(config.db.as_deref())?;
        let rng = StdRng::seed_from_u64(config.seed);
        Ok(State {
            base: format!("http://{addr}"),
            config,
            store: Mutex::new(store),
            tokens: Mutex::new(HashMap::new()),
            rng: Mutex::new(rng),
            counters: Counters::default(),
        })
    }

    pub fn stats(&self) -> Stats {
        let (requests, faults) = self.counters.snapshot();
        let store = lock(&self.store);
        Stats {
            requests,
            faults,
            resources: store.counts().unwrap_or_default(),
            crids_assigned: store.crid_count().unwrap_or(0),
        }
    }

    fn issue_token(&self, ccns: &[String]) -> String {
        let mut bytes = vec![0u8; TOKEN_BYTES];
        rand::rng().fill(&mut bytes[..]);
        let token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&bytes);
        let now = Instant::now();
        let mut tokens = lock(&self.tokens);
        // Keep the table small on long runs with short-lived tokens.
        if tokens.len() > 10_000 {
            tokens.retain(|_, g| g.expires > now);
        }
        tokens.insert(
            token.clone(),
            Grant {
                expires: now + Duration::from_secs(self.config.token_ttl_secs),
                ccns: Arc::new(ccns.to_vec()),
            },
        );
        token
    }

    /// The centers a bearer token is entitled to, if it is known and not expired.
    fn authorize(&self, headers: &HeaderMap) -> Option<Arc<Vec<String>>> {
        let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
        let (scheme, token) = value.split_once(' ')?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return None;
        }
        let tokens = lock(&self.tokens);
        let grant = tokens.get(token.trim())?;
        (Instant::now() < grant.expires).then(|| grant.ccns.clone())
    }
}

/// What a request is, for routing, counting and fault decisions.
enum Route {
    Token,
    Crid,
    Stats,
    Metadata,
    Transaction,
    Create(String),
    Search(String),
    Read(String, String),
    Update(String, String),
    Unsupported,
}

fn classify(method: &Method, path: &str) -> Route {
    let known = |t: &str| fhir::type_def(t).is_some();
    match (method, path) {
        (&Method::POST, TOKEN_PATH) => return Route::Token,
        (&Method::PUT, "/CRID") => return Route::Crid,
        (&Method::GET, "/_sandbox/stats") => return Route::Stats,
        (&Method::GET, "/r4/metadata") => return Route::Metadata,
        (&Method::POST, "/r4") => return Route::Transaction,
        _ => {}
    }
    let Some(rest) = path.strip_prefix("/r4/") else {
        return Route::Unsupported;
    };
    let parts: Vec<&str> = rest.split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::POST, [t]) if known(t) => Route::Create((*t).to_string()),
        (&Method::GET, [t]) if known(t) => Route::Search((*t).to_string()),
        (&Method::GET, [t, id]) if known(t) && !id.is_empty() => {
            Route::Read((*t).to_string(), (*id).to_string())
        }
        (&Method::PUT, [t, id]) if known(t) && !id.is_empty() => {
            Route::Update((*t).to_string(), (*id).to_string())
        }
        _ => Route::Unsupported,
    }
}

impl Route {
    fn interaction(&self) -> String {
        match self {
            Route::Token => "token".into(),
            Route::Crid => "crid".into(),
            Route::Stats => "stats".into(),
            Route::Metadata => "metadata".into(),
            Route::Transaction => "transaction".into(),
            Route::Create(t) => format!("create:{t}"),
            Route::Search(t) => format!("search:{t}"),
            Route::Read(t, _) => format!("read:{t}"),
            Route::Update(t, _) => format!("update:{t}"),
            Route::Unsupported => "unsupported".into(),
        }
    }
}

/// The faults drawn for one request.
#[derive(Default)]
struct Plan {
    delay: Duration,
    before: Option<Before>,
    lose_answer: bool,
}

enum Before {
    Drop,
    Throttle,
    Error(u16),
}

impl State {
    fn plan(&self) -> Plan {
        let f = &self.config.faults;
        if !f.any() {
            return Plan::default();
        }
        // Always the same number of draws per request, so that a seed reproduces the faults of
        // the n-th request whatever happened before it.
        let mut rng = lock(&self.rng);
        let jitter = if f.jitter_ms > 0 {
            rng.random_range(0..=f.jitter_ms)
        } else {
            0
        };
        let drop: f64 = rng.random();
        let throttle: f64 = rng.random();
        let error: f64 = rng.random();
        let error_503: bool = rng.random();
        let lose: f64 = rng.random();
        let before = if drop < f.drop_rate {
            Some(Before::Drop)
        } else if throttle < f.throttle_rate {
            Some(Before::Throttle)
        } else if error < f.error_rate {
            Some(Before::Error(if error_503 { 503 } else { 500 }))
        } else {
            None
        };
        Plan {
            delay: Duration::from_millis(f.latency_ms + jitter),
            lose_answer: before.is_none() && lose < f.lost_answer_rate,
            before,
        }
    }
}

/// Serves connections until `shutdown` completes, then drops the open ones.
pub async fn accept_loop(
    state: Arc<State>,
    listener: tokio::net::TcpListener,
    shutdown: impl std::future::Future<Output = ()> + Send,
) {
    tokio::pin!(shutdown);
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, _peer)) => {
                    let _ = stream.set_nodelay(true);
                    let st = state.clone();
                    conns.spawn(async move {
                        let svc = hyper::service::service_fn(move |req| handle(st.clone(), req));
                        // An error here is a client going away or an injected cut: nothing to do.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .keep_alive(true)
                            .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                            .await;
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "Sandbox could not accept a connection");
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            },
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
        }
    }
    conns.abort_all();
    while conns.join_next().await.is_some() {}
    tracing::info!("Sandbox stopped");
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Result<Resp, Cut> {
    let route = classify(req.method(), req.uri().path());
    let interaction = route.interaction();
    let faulted = match route {
        Route::Stats => false,
        Route::Token => state.config.faults.include_token_endpoint,
        _ => true,
    };
    let plan = if faulted {
        state.plan()
    } else {
        Plan::default()
    };
    if !plan.delay.is_zero() {
        state.counters.fault("latency");
        tokio::time::sleep(plan.delay).await;
    }
    match plan.before {
        Some(Before::Drop) => {
            state.counters.fault("drop");
            state.counters.request(&interaction, "dropped");
            return Err(Cut);
        }
        Some(Before::Throttle) => {
            state.counters.fault("throttle");
            state.counters.request(&interaction, "429");
            let mut r = fhir_error(&FhirError::new(
                429,
                "throttled",
                "too many requests (injected)",
            ));
            if let Ok(v) = HeaderValue::from_str(&state.config.faults.retry_after_secs.to_string())
            {
                r.headers_mut().insert(header::RETRY_AFTER, v);
            }
            return Ok(r);
        }
        Some(Before::Error(code)) => {
            state.counters.fault("error");
            state.counters.request(&interaction, &code.to_string());
            return Ok(fhir_error(&FhirError::new(
                code,
                "transient",
                "server error (injected)",
            )));
        }
        None => {}
    }
    let (parts, body) = req.into_parts();
    let body = match Limited::new(body, MAX_BODY).collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => {
            state.counters.request(&interaction, "413");
            return Ok(fhir_error(&FhirError::new(
                413,
                "too-costly",
                "request body too large or unreadable",
            )));
        }
    };
    let counted = !matches!(route, Route::Stats);
    let resp = dispatch(&state, route, &parts, &body);
    tracing::trace!(interaction = %interaction, status = resp.status().as_u16(), "Sandbox request");
    if counted {
        state.counters.request(&interaction, resp.status().as_str());
    }
    if plan.lose_answer {
        state.counters.fault("lost_answer");
        return Err(Cut);
    }
    Ok(resp)
}

fn respond(status: u16, content_type: &'static str, body: String) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn fhir_error(e: &FhirError) -> Resp {
    let mut r = respond(e.status, FHIR_JSON, e.outcome().to_string());
    if e.status == 401 {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn fhir_ok(ok: FhirOk) -> Resp {
    let mut r = respond(ok.status, FHIR_JSON, ok.body);
    if let Some(loc) = ok.location
        && let Ok(v) = HeaderValue::from_str(&loc)
    {
        r.headers_mut().insert(header::LOCATION, v);
    }
    if let Some(v) = ok.version
        && let Ok(v) = HeaderValue::from_str(&format!("W/\"{v}\""))
    {
        r.headers_mut().insert(header::ETAG, v);
    }
    r
}

fn now_string() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn is_json_body(parts: &hyper::http::request::Parts) -> bool {
    match parts.headers.get(header::CONTENT_TYPE) {
        None => true,
        Some(v) => v
            .to_str()
            .map(|s| {
                let s = s.to_ascii_lowercase();
                s.starts_with("application/fhir+json") || s.starts_with("application/json")
            })
            .unwrap_or(false),
    }
}

fn dispatch(state: &State, route: Route, parts: &hyper::http::request::Parts, body: &[u8]) -> Resp {
    match route {
        Route::Stats => respond(
            200,
            JSON,
            serde_json::to_string(&state.stats()).unwrap_or_default(),
        ),
        Route::Token => token(state, &parts.headers, body),
        // Capabilities are public, as on most FHIR servers: a client may look before it logs in.
        Route::Metadata => respond(
            200,
            FHIR_JSON,
            fhir::capability_statement(&state.base, &now_string()),
        ),
        Route::Crid => crid(state, parts, body),
        Route::Unsupported => fhir_error(&FhirError::new(
            405,
            "not-supported",
            format!(
                "{} {} is not supported by this server",
                parts.method,
                parts.uri.path()
            ),
        )),
        route => {
            let Some(ccns) = state.authorize(&parts.headers) else {
                return fhir_error(&FhirError::new(
                    401,
                    "login",
                    "missing, unknown or expired bearer token",
                ));
            };
            let ctx = Ctx {
                base: &state.base,
                ccns: &ccns,
                now: now_string(),
                default_page_size: state.config.default_page_size,
                max_page_size: state.config.max_page_size,
                max_bundle_entries: state.config.max_bundle_entries,
            };
            let writes = matches!(
                route,
                Route::Create(_) | Route::Update(..) | Route::Transaction
            );
            if writes && !is_json_body(parts) {
                return fhir_error(&FhirError::new(
                    415,
                    "not-supported",
                    "send application/fhir+json",
                ));
            }
            let result = match route {
                Route::Create(t) => fhir::create(&state.store, &ctx, &t, body),
                Route::Update(t, id) => fhir::update(&state.store, &ctx, &t, &id, body),
                Route::Read(t, id) => fhir::read(&lock(&state.store), &ctx, &t, &id),
                Route::Search(t) => {
                    let query: Vec<(String, String)> = parts
                        .uri
                        .query()
                        .map(|q| {
                            url::form_urlencoded::parse(q.as_bytes())
                                .into_owned()
                                .collect()
                        })
                        .unwrap_or_default();
                    fhir::search(&lock(&state.store), &ctx, &t, &query)
                }
                Route::Transaction => fhir::transaction(&mut lock(&state.store), &ctx, body),
                _ => Err(FhirError::new(500, "exception", "unrouted request")),
            };
            match result {
                Ok(ok) => fhir_ok(ok),
                Err(e) => fhir_error(&e),
            }
        }
    }
}

fn crid_error(status: u16, message: &str) -> Resp {
    let mut r = respond(status, JSON, json!({ "errorMessage": message }).to_string());
    if status == 401 {
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    r
}

fn crid(state: &State, parts: &hyper::http::request::Parts, body: &[u8]) -> Resp {
    let Some(ccns) = state.authorize(&parts.headers) else {
        return crid_error(401, "missing, unknown or expired bearer token");
    };
    let req = match CridRequest::parse(body) {
        Ok(r) => r,
        Err(e) => return crid_error(400, &e.0),
    };
    if !ccns.contains(&req.ccn) {
        return crid_error(403, "the token is not entitled to this center (ccn)");
    }
    let now = now_string();
    let mut store = lock(&state.store);
    match store.transaction(|s| lookup_or_assign(s, &req, &now)) {
        Ok(v) => respond(200, JSON, v.to_string()),
        Err(e) => {
            tracing::error!(error = %crate::cli::error_chain(&e), "Sandbox store failed");
            crid_error(500, "the sandbox store failed")
        }
    }
}

fn oauth_error(status: u16, error: &str, description: &str) -> Resp {
    let mut r = respond(
        status,
        JSON,
        json!({"error": error, "error_description": description}).to_string(),
    );
    if status == 401 {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"sandbox\""),
        );
    }
    r
}

/// `POST /oauth2/token`: password and client_credentials grants; the client authenticates with
/// HTTP Basic (as the IG documents) or with `client_id`/`client_secret` in the form.
fn token(state: &State, headers: &HeaderMap, body: &[u8]) -> Resp {
    let form: HashMap<String, String> = url::form_urlencoded::parse(body).into_owned().collect();
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|b| base64::engine::general_purpose::STANDARD.decode(b).ok())
        .and_then(|b| String::from_utf8(b).ok())
        .and_then(|s| {
            let (id, secret) = s.split_once(':')?;
            Some((id.to_string(), secret.to_string()))
        });
    let (client_id, client_secret) = match basic {
        Some(pair) => pair,
        None => match (form.get("client_id"), form.get("client_secret")) {
            (Some(id), Some(secret)) => (id.clone(), secret.clone()),
            _ => return oauth_error(401, "invalid_client", "client authentication is required"),
        },
    };
    let Some(account) = state
        .config
        .accounts
        .iter()
        .find(|a| a.client_id == client_id && a.client_secret.expose() == client_secret)
    else {
        return oauth_error(401, "invalid_client", "client authentication failed");
    };
    match form.get("grant_type").map(String::as_str) {
        Some("password") => {
            let user_ok = form.get("username").map(String::as_str) == Some(&account.username);
            let pass_ok =
                form.get("password").map(String::as_str) == Some(account.password.expose());
            if !(user_ok && pass_ok) {
                return oauth_error(
                    400,
                    "invalid_grant",
                    "the resource owner credentials are wrong",
                );
            }
        }
        Some("client_credentials") => {}
        Some(_) => {
            return oauth_error(
                400,
                "unsupported_grant_type",
                "use grant_type=password or client_credentials",
            );
        }
        None => return oauth_error(400, "invalid_request", "grant_type is required"),
    }
    let scope = match form.get("scope") {
        None => account.scopes[0].clone(),
        Some(requested) => {
            let all_known = requested
                .split_whitespace()
                .all(|s| account.scopes.iter().any(|k| k == s));
            if !all_known || requested.trim().is_empty() {
                return oauth_error(400, "invalid_scope", "the requested scope is not allowed");
            }
            requested.clone()
        }
    };
    let token = state.issue_token(&account.ccns);
    let mut r = respond(
        200,
        JSON,
        json!({
            "token_type": "Bearer",
            "expires_in": state.config.token_ttl_secs,
            "access_token": token,
            "scope": scope,
        })
        .to_string(),
    );
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}
