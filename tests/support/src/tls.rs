//! A TLS front for the local broker, so that `amqps://` is tested without reconfiguring the
//! shared RabbitMQ: [`TlsProxy`] accepts TLS on a free local port with the test certificate
//! (`certs/server.pem`, for `localhost` and `127.0.0.1`, signed by `certs/ca.pem`) and passes
//! the plain bytes on to the broker.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;

/// The path of a file of the test certificates.
pub fn cert_path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("certs")
        .join(name)
}

/// A running TLS front; it stops when dropped.
pub struct TlsProxy {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl TlsProxy {
    /// Starts a TLS front on a free local port that forwards to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let certs = CertificateDer::pem_file_iter(cert_path("server.pem"))
            .expect("test certificate")
            .collect::<Result<Vec<_>, _>>()
            .expect("test certificate parses");
        let key = PrivateKeyDer::from_pem_file(cert_path("server.key")).expect("test key");
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server certificate");
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("TLS front binds");
        let addr = listener.local_addr().expect("TLS front address");
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(client).await else {
                        return;
                    };
                    let Ok(mut server) = TcpStream::connect(target).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut server).await;
                });
            }
        });
        Self { addr, task }
    }

    /// Starts a TLS front for the test broker: give farine
    /// [`Broker::amqps_uri_via`](crate::Broker::amqps_uri_via)`(front.port())`.
    pub async fn to_broker() -> Self {
        Self::start(crate::broker_addr()).await
    }

    /// The local port the front listens on.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for TlsProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}
