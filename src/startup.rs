//! Building and running a node: the store, the shared gateway state, the HTTP listener.
//! Port 0 works: the bound address is exposed so tests can start nodes freely.

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;

use actix_web::dev::Server;
use actix_web::http::Method;
use actix_web::middleware::DefaultHeaders;
use actix_web::{web, App, HttpRequest, HttpResponse, HttpServer};

use crate::api_error::{ApiError, API_VERSION};
use crate::config::{Settings, StoreSettings};
use crate::gateway::{self, Gateway};
use crate::route;
use crate::store::{MemoryStore, Store};
use crate::upstream::Upstream;

pub struct Application {
    server: Server,
    addr: SocketAddr,
}

impl Application {
    /// Binds the listener and prepares the server; nothing is served until `run`.
    pub fn build(settings: Settings) -> anyhow::Result<Application> {
        // Several crates link rustls; choose its crypto once per process (a second call
        // finds it chosen and changes nothing).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let store: Arc<dyn Store> = match &settings.store {
            StoreSettings::Memory => Arc::new(MemoryStore::new()),
        };
        let gateway = web::Data::new(Gateway::new(&settings, store));
        let listener = TcpListener::bind(settings.listen_addr())
            .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", settings.server.listen))?;
        let addr = listener.local_addr()?;
        let upstream_settings = settings.upstream.clone();
        let auth = gateway.auth.clone();
        let mut server = HttpServer::new(move || {
            App::new()
                .app_data(gateway.clone())
                .app_data(web::Data::new(Upstream::new(
                    &upstream_settings,
                    auth.clone(),
                )))
                .wrap(DefaultHeaders::new().add(API_VERSION))
                .route(
                    "/healthz",
                    web::get().to(|| async { HttpResponse::Ok().body("ok") }),
                )
                .default_service(web::to(dispatch))
        })
        .listen(listener)?;
        if let Some(workers) = settings.server.workers {
            server = server.workers(workers);
        }
        let server = server.disable_signals().shutdown_timeout(5).run();
        Ok(Application { server, addr })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// A handle to stop the server from elsewhere.
    pub fn handle(&self) -> actix_web::dev::ServerHandle {
        self.server.handle()
    }

    pub async fn run_until_stopped(self) -> std::io::Result<()> {
        self.server.await
    }
}

async fn dispatch(
    req: HttpRequest,
    gw: web::Data<Gateway>,
    up: web::Data<Upstream>,
) -> Result<HttpResponse, ApiError> {
    let started = std::time::Instant::now();
    let Some(parsed) = route::parse(req.path()) else {
        return Err(ApiError::NameUnknown(format!(
            "no such path: {}",
            req.path()
        )));
    };
    let result = match parsed {
        Ok(route) => {
            let kind = route.kind();
            let result = gateway::handle(&gw, &up, &req, route).await;
            log_request(&req, kind, &result, started);
            return result;
        }
        // A write to a malformed path is still first of all a write.
        Err(_) if !matches!(*req.method(), Method::GET | Method::HEAD) => {
            Err(ApiError::Unsupported(format!(
                "{} is not supported: this registry is read-only (GET and HEAD)",
                req.method()
            )))
        }
        Err(e) => Err(e),
    };
    log_request(&req, "invalid", &result, started);
    result
}

fn log_request(
    req: &HttpRequest,
    route: &'static str,
    result: &Result<HttpResponse, ApiError>,
    started: std::time::Instant,
) {
    let status = match result {
        Ok(r) => r.status().as_u16(),
        Err(e) => actix_web::ResponseError::status_code(e).as_u16(),
    };
    let backend = result
        .as_ref()
        .ok()
        .and_then(|r| r.headers().get(gateway::BACKEND_HEADER))
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    tracing::info!(
        method = %req.method(),
        path = req.path(),
        route,
        status,
        backend,
        micros = started.elapsed().as_micros() as u64,
        "request"
    );
}
