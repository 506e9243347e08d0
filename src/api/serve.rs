//! The HTTP/1.1 accept loop. `axum::serve` offers no header read timeout, so a client
//! trickling its request headers could hold a connection forever; this loop serves the
//! same router through hyper with one, and shuts down gracefully like `axum::serve`.

use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Serves `router` on `listener` until `stop` is cancelled, then lets open requests
/// finish (within `SHUTDOWN_GRACE`). A connection whose next request header is not
/// complete `header_timeout` after the server started reading it (the connection opened,
/// or the previous response went out) is closed; so are idle kept-alive connections.
pub async fn serve(
    listener: TcpListener,
    router: Router,
    header_timeout: Duration,
    stop: CancellationToken,
) {
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(header_timeout);
    let graceful = GracefulShutdown::new();
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.cancelled() => break,
        };
        let stream = match accepted {
            Ok((stream, _peer)) => {
                // Responses are written whole; waiting to coalesce them only adds latency.
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(error = %e, "TCP_NODELAY not set");
                }
                stream
            }
            Err(e) => {
                // Per-connection failures (reset before accept) are not the listener's;
                // running out of file descriptors clears up when connections close.
                if !is_connection_error(&e) {
                    warn!(error = %e, "accepting a connection failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                continue;
            }
        };
        let service = TowerToHyperService::new(router.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                debug!(error = %e, "connection ended with an error");
            }
        });
    }
    // New connections are refused from now on; idle ones close at once; requests in
    // flight (a long poll, a stream) get up to SHUTDOWN_GRACE to finish.
    drop(listener);
    let open = graceful.count();
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        warn!(
            connections = open,
            "HTTP requests still running after the shutdown grace; not waiting for them"
        );
    }
}

/// How long open HTTP requests may run on after the server is told to stop.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(30);

fn is_connection_error(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused | ConnectionAborted | ConnectionReset
    )
}
