//! The health endpoint as an HTTP server, spoken to over raw TCP: keep-alive, `HEAD`, the
//! answers to wrong methods and paths, and clients that send garbage or stall, none of which
//! may keep another client from its answer.

mod common;

use std::time::Duration;

use common::{BOUND, config};
use farine::{Running, Runtime, consume};
use farine_test_support::{Broker, free_port, http_get, unique};
use serde_json::Value;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

#[derive(Default)]
struct HealthProbe;

#[farine::service(name = "health_probe")]
impl HealthProbe {
    #[consume(exchange = "x", routing_key = "rk")]
    async fn on_message(&self, _body: Value) {}
}

/// A running `health_probe` with its health endpoint on a port of its own.
struct Probe {
    running: Running,
    port: u16,
    _broker: Broker,
}

impl Probe {
    async fn start(name: &str) -> Self {
        Self::start_with(name, &[]).await
    }

    async fn start_with(name: &str, options: &[(&str, &str)]) -> Self {
        let broker = Broker::connect().await;
        let port = free_port();
        let (exchange, queue) = (unique(&format!("{name}-x")), unique(&format!("{name}-q")));
        let health = format!("127.0.0.1:{port}");
        let mut options = options.to_vec();
        options.extend([
            ("on_message.exchange", exchange.as_str()),
            ("on_message.queue", queue.as_str()),
            ("health_addr", health.as_str()),
        ]);
        let config = config(&broker, "health_probe", &options);
        let running = Runtime::new(config)
            .services(["health_probe"])
            .start()
            .await
            .expect("starts");
        Self {
            running,
            port,
            _broker: broker,
        }
    }

    async fn connect(&self) -> TcpStream {
        TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("the health endpoint accepts")
    }
}

/// An HTTP response as read off the wire.
#[derive(Debug)]
struct Answer {
    status: u16,
    /// Header names lower-cased.
    headers: Vec<(String, String)>,
    body: String,
}

impl Answer {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Reads one response from `reader`: its head, then as many body bytes as its
/// `content-length` says (none after a `HEAD`).
async fn read_answer(reader: &mut (impl AsyncBufRead + Unpin), head: bool) -> Answer {
    tokio::time::timeout(BOUND, async {
        let mut line = String::new();
        reader.read_line(&mut line).await.expect("a status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("a status line, not {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).await.expect("a header line");
            let line = line.trim_end();
            if line.is_empty() {
                break;
            }
            let (name, value) = line.split_once(':').expect("a header");
            headers.push((name.to_ascii_lowercase(), value.trim().to_string()));
        }
        let mut answer = Answer {
            status,
            headers,
            body: String::new(),
        };
        let length: usize = answer
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if !head {
            let mut body = vec![0; length];
            reader.read_exact(&mut body).await.expect("the body");
            answer.body = String::from_utf8(body).expect("a UTF-8 body");
        }
        answer
    })
    .await
    .expect("an answer within the bound")
}

/// Sends `request` on a connection of its own and reads everything until the server closes it.
async fn exchange_once(probe: &Probe, request: &[u8]) -> String {
    let mut stream = probe.connect().await;
    stream
        .write_all(request)
        .await
        .expect("the request is sent");
    let mut response = Vec::new();
    tokio::time::timeout(BOUND, stream.read_to_end(&mut response))
        .await
        .expect("the server closes the connection within the bound")
        .expect("the response is read");
    String::from_utf8_lossy(&response).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kept_alive_connection_is_answered_twice_and_closed_when_the_runtime_stops() {
    let probe = Probe::start("keepalive").await;
    let (read, mut write) = probe.connect().await.into_split();
    let mut reader = BufReader::new(read);

    write
        .write_all(b"GET /live HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("first request sent");
    let first = read_answer(&mut reader, false).await;
    assert_eq!(first.status, 200, "{first:?}");
    assert_eq!(first.body, r#"{"status":"live"}"#);
    assert_eq!(first.header("cache-control"), Some("no-store"));
    assert_eq!(first.header("content-type"), Some("application/json"));

    write
        .write_all(b"GET /ready?verbose=1 HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("second request sent on the same connection");
    let second = read_answer(&mut reader, false).await;
    assert_eq!(second.status, 200, "{second:?}");
    assert!(
        second.body.contains(r#""health_probe.on_message":"up""#),
        "{second:?}"
    );

    // Stopping closes the idle, kept-alive connection at once, well before the header-read
    // timeout (5 s) would: the client reads the end of the stream.
    let stopping = tokio::time::Instant::now();
    probe.running.stop().await;
    let mut rest = Vec::new();
    let read = tokio::time::timeout_at(
        stopping + Duration::from_secs(3),
        reader.read_to_end(&mut rest),
    )
    .await
    .expect("the connection is closed on stop");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?} {rest:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_kept_alive_connection_is_closed_after_the_timeout() {
    let probe = Probe::start("idle").await;
    let (read, mut write) = probe.connect().await.into_split();
    let mut reader = BufReader::new(read);
    write
        .write_all(b"GET /live HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .expect("request sent");
    assert_eq!(read_answer(&mut reader, false).await.status, 200);

    // No next request: the connection is closed when the header-read timeout (5 s) ends.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), reader.read_to_end(&mut rest))
        .await
        .expect("the idle connection is closed after the timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?} {rest:?}");
    probe.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn head_answers_the_headers_of_get_and_no_body() {
    let probe = Probe::start("head").await;
    let (status, get_body) = http_get(probe.port, "/health/live")
        .await
        .expect("GET answers");
    assert_eq!(status, 200);

    let response = exchange_once(
        &probe,
        b"HEAD /health/live HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await;
    let (head, body) = response.split_once("\r\n\r\n").expect("a whole head");
    assert_eq!(body, "", "no body after the head: {response:?}");
    let mut reader = BufReader::new(response.as_bytes());
    let answer = read_answer(&mut reader, true).await;
    assert_eq!(answer.status, 200, "{head}");
    assert_eq!(
        answer.header("content-length"),
        Some(get_body.len().to_string().as_str()),
        "{head}"
    );
    assert_eq!(answer.header("content-type"), Some("application/json"));
    assert_eq!(answer.header("cache-control"), Some("no-store"));
    probe.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_request_gets_400_and_the_endpoint_answers_the_next_client() {
    let probe = Probe::start("garbage").await;
    let response = exchange_once(&probe, b"\x01\x02 not http at all\r\n\r\n").await;
    assert!(response.starts_with("HTTP/1.1 400"), "{response:?}");
    assert_eq!(
        http_get(probe.port, "/live").await.map(|r| r.0),
        Some(200),
        "another client is answered"
    );
    probe.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_stalled_mid_request_does_not_delay_another_and_is_cut_after_the_timeout() {
    let probe = Probe::start("slow").await;
    let mut slow = probe.connect().await;
    slow.write_all(b"GET /li")
        .await
        .expect("half a request line sent");

    // With the slow client still open, another one is answered at once.
    let other = tokio::time::timeout(Duration::from_secs(2), http_get(probe.port, "/live"))
        .await
        .expect("another client is answered at once");
    assert_eq!(other.map(|r| r.0), Some(200));

    // The slow client is cut when the header-read timeout (5 s) ends, with no answer.
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), slow.read_to_end(&mut rest))
        .await
        .expect("the stalled connection is closed after the header-read timeout");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?} {rest:?}");
    probe.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn post_gets_405_with_the_allowed_methods() {
    let probe = Probe::start("post").await;
    let response = exchange_once(
        &probe,
        b"POST /live HTTP/1.1\r\nhost: localhost\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .await;
    let mut reader = BufReader::new(response.as_bytes());
    let answer = read_answer(&mut reader, false).await;
    assert_eq!(answer.status, 405, "{response}");
    assert_eq!(answer.header("allow"), Some("GET, HEAD"), "{response}");
    probe.running.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_path_is_404_and_metrics_are_served_unless_turned_off() {
    let probe = Probe::start("notfound").await;
    let (status, body) = http_get(probe.port, "/nowhere")
        .await
        .expect("health answers");
    assert_eq!(status, 404, "{body}");
    let error: Value = serde_json::from_str(&body).expect("a JSON body");
    assert!(error["error"].is_string(), "{body}");
    let mut reader = BufReader::new(probe.connect().await);
    reader
        .get_mut()
        .write_all(b"GET /metrics HTTP/1.1\r\nhost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = read_answer(&mut reader, false).await;
    assert_eq!(answer.status, 200);
    assert_eq!(
        answer.header("content-type"),
        Some("text/plain; version=0.0.4; charset=utf-8")
    );
    probe.running.stop().await;

    let probe = Probe::start_with("nometrics", &[("metrics", "false")]).await;
    let (status, body) = http_get(probe.port, "/metrics")
        .await
        .expect("health answers");
    assert_eq!(status, 404, "{body}");
    probe.running.stop().await;
}
