//! The HTTP/1.1 accept loop. `axum::serve` offers no header read timeout, so a client
//! trickling its request headers could hold a connection forever; this loop serves the
//! same router through hyper with one, shuts down gracefully like `axum::serve`, and
//! closes connections the way nginx's `lingering_close` does.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
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
        let conn = graceful
            .watch(http.serve_connection(TokioIo::new(LingeringClose(Some(stream))), service));
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

/// How long a closing connection may keep sending before it is dropped anyway.
const LINGER_TOTAL: Duration = Duration::from_secs(10);
/// How long a closing connection may stay silent before it is dropped.
const LINGER_IDLE: Duration = Duration::from_secs(2);

/// A connection that, when hyper is done with it, shuts its write half and reads and
/// discards what the client still sends (bounded by `LINGER_TOTAL`/`LINGER_IDLE`)
/// before closing. Closing a socket with unread input makes the kernel send a reset,
/// which can destroy the response just written: a client still uploading a body that
/// was refused early (413 on a declared 100 MB length) would see "connection reset"
/// instead of the JSON error.
struct LingeringClose(Option<TcpStream>);

impl LingeringClose {
    fn stream(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        match self.get_mut().0.as_mut() {
            Some(s) => Pin::new(s),
            None => unreachable!("the stream is only taken out in Drop"),
        }
    }
}

impl AsyncRead for LingeringClose {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringClose {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.as_ref().is_some_and(|s| s.is_write_vectored())
    }
}

impl Drop for LingeringClose {
    fn drop(&mut self) {
        let (Some(stream), Ok(rt)) = (self.0.take(), tokio::runtime::Handle::try_current()) else {
            return;
        };
        rt.spawn(linger(stream));
    }
}

/// Sends FIN, then drains the client's input until it closes, goes quiet or the
/// total linger time is up; dropping the stream afterwards closes it without a reset.
async fn linger(mut stream: TcpStream) {
    let _ = stream.shutdown().await;
    let mut sink = [0u8; 16 * 1024];
    let drain = async {
        loop {
            match tokio::time::timeout(LINGER_IDLE, stream.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => continue,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(LINGER_TOTAL, drain).await;
}
