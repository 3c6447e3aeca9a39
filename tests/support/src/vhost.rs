//! A RabbitMQ virtual host of the test's own, made and deleted through the management HTTP API
//! (`rabbitmq_management`, which `scripts/services` enables).
//!
//! Every exchange, queue and binding a test makes lives in its vhost, so no two tests and no two
//! runs of the suite can meet, whatever names they choose, and deleting the vhost removes all of
//! it (and closes every connection still open in it). Vhosts of test processes that died without
//! cleaning up (killed by a timeout, say) are deleted by the next test that starts.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Every vhost the tests make starts with this, followed by `<pid>-`.
const PREFIX: &str = "farine-test-";

/// The broker the tests use: `$FARINE_TEST_AMQP_URI`, else the local RabbitMQ. Its path (the
/// vhost) is ignored: tests run in vhosts of their own.
pub(crate) fn base_uri() -> String {
    std::env::var("FARINE_TEST_AMQP_URI")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".to_string())
}

/// The parts of [`base_uri`]: `(user, password, host:port)`.
pub(crate) fn broker_parts() -> (String, String, String) {
    let uri = base_uri();
    let rest = uri.split_once("://").map_or(uri.as_str(), |(_, r)| r);
    let rest = rest.split('/').next().unwrap_or(rest);
    let (credentials, host) = rest.rsplit_once('@').unwrap_or(("guest:guest", rest));
    let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
    (user.to_string(), password.to_string(), host.to_string())
}

/// The management API: `$FARINE_TEST_MANAGEMENT`, else port 15672 of the broker's host.
fn management_addr() -> SocketAddr {
    let addr = std::env::var("FARINE_TEST_MANAGEMENT").unwrap_or_else(|_| {
        let (_, _, host) = broker_parts();
        let host = host.rsplit_once(':').map_or(host.as_str(), |(h, _)| h);
        format!("{host}:15672")
    });
    addr.to_socket_addrs()
        .ok()
        .and_then(|mut addrs| addrs.next())
        .unwrap_or_else(|| panic!("the management API address `{addr}` resolves"))
}

/// A new vhost name: the test process's pid (so a dead process's vhosts can be found), the
/// time and a counter.
pub(crate) fn new_name() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos() % 1_000_000_000_000)
        .unwrap_or(0);
    format!(
        "{PREFIX}{}-{nanos}-{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Makes `vhost` (the user of [`base_uri`] gets every permission on it); panics with what to
/// do when the management API does not answer.
pub(crate) fn create(vhost: &str) {
    reap_dead_processes_vhosts();
    let (status, body) =
        request("PUT", &format!("/api/vhosts/{vhost}")).unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status == 201 || status == 204,
        "creating vhost {vhost}: HTTP {status} {body}"
    );
    let (user, _, _) = broker_parts();
    let (status, body) = request_with_body(
        "PUT",
        &format!("/api/permissions/{vhost}/{user}"),
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )
    .unwrap_or_else(|e| panic!("{e}"));
    assert!(
        status == 201 || status == 204,
        "permissions on vhost {vhost}: HTTP {status} {body}"
    );
}

/// Deletes `vhost` with everything in it; the error says why it could not.
pub(crate) fn delete(vhost: &str) -> Result<(), String> {
    match request("DELETE", &format!("/api/vhosts/{vhost}"))? {
        (204 | 404, _) => Ok(()),
        (status, body) => Err(format!("deleting vhost {vhost}: HTTP {status} {body}")),
    }
}

/// `GET path` on the management API, as JSON.
pub fn get(path: &str) -> Result<serde_json::Value, String> {
    let (status, body) = request("GET", path)?;
    if status != 200 {
        return Err(format!("GET {path}: HTTP {status} {body}"));
    }
    serde_json::from_str(&body).map_err(|e| format!("GET {path}: {e}: {body}"))
}

/// Makes RabbitMQ user `user` with `password` (no tags: it may use AMQP, not the management
/// API) and gives it every permission on `vhost`; remove it with [`delete_user`]. For tests
/// that need a password of their own, one no other text of the test contains.
pub fn create_user(vhost: &str, user: &str, password: &str) -> Result<(), String> {
    let body = serde_json::json!({ "password": password, "tags": "" }).to_string();
    match request_with_body("PUT", &format!("/api/users/{user}"), &body)? {
        (201 | 204, _) => {}
        (status, body) => return Err(format!("creating user {user}: HTTP {status} {body}")),
    }
    match request_with_body(
        "PUT",
        &format!("/api/permissions/{vhost}/{user}"),
        r#"{"configure":".*","write":".*","read":".*"}"#,
    )? {
        (201 | 204, _) => Ok(()),
        (status, body) => Err(format!(
            "permissions of user {user} on vhost {vhost}: HTTP {status} {body}"
        )),
    }
}

/// Deletes RabbitMQ user `user` (made by [`create_user`]); a user already gone is no error.
pub fn delete_user(user: &str) -> Result<(), String> {
    match request("DELETE", &format!("/api/users/{user}"))? {
        (204 | 404, _) => Ok(()),
        (status, body) => Err(format!("deleting user {user}: HTTP {status} {body}")),
    }
}

/// The names of the vhosts on the broker.
pub fn list() -> Result<Vec<String>, String> {
    let names = get("/api/vhosts?columns=name")?;
    Ok(names
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|v| v["name"].as_str().map(str::to_string))
        .collect())
}

/// Whether `vhost` is the vhost of a test process that still runs.
pub fn of_a_running_test(vhost: &str) -> bool {
    vhost
        .strip_prefix(PREFIX)
        .and_then(|rest| rest.split('-').next())
        .and_then(|pid| pid.parse::<i32>().ok())
        .is_some_and(|pid| {
            // SAFETY: kill(2) with signal 0 only asks whether the process exists.
            let exists = unsafe { libc::kill(pid, 0) } == 0;
            exists || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        })
}

/// Deletes (once per test process) the test vhosts whose process is gone.
fn reap_dead_processes_vhosts() {
    static DONE: AtomicBool = AtomicBool::new(false);
    if DONE.swap(true, Ordering::SeqCst) {
        return;
    }
    let Ok(names) = list() else { return };
    for name in names {
        if name.starts_with(PREFIX)
            && !of_a_running_test(&name)
            && let Err(e) = delete(&name)
        {
            eprintln!("test support: stale {e}");
        }
    }
}

fn request(method: &str, path: &str) -> Result<(u16, String), String> {
    request_with_body(method, path, "")
}

/// One HTTP/1.1 request to the management API, with the broker's user and password.
fn request_with_body(method: &str, path: &str, body: &str) -> Result<(u16, String), String> {
    let addr = management_addr();
    let unreachable = |e: std::io::Error| {
        format!(
            "the RabbitMQ management API at {addr} does not answer ({e}): the tests make a vhost \
             each through it; run scripts/services, which enables rabbitmq_management"
        )
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, Duration::from_secs(5)).map_err(unreachable)?;
    stream
        .set_read_timeout(Some(Duration::from_secs(30)))
        .map_err(unreachable)?;
    let (user, password, _) = broker_parts();
    let auth = base64(format!("{user}:{password}").as_bytes());
    let request = format!(
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\nauthorization: Basic {auth}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).map_err(unreachable)?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response).map_err(unreachable)?;
    let response = String::from_utf8_lossy(&response);
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("{method} {path}: not an HTTP response: {response}"))?;
    let body = response
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, dechunk(&response, body)))
}

/// The body of a chunked response, joined; any other body as it is.
fn dechunk(response: &str, body: String) -> String {
    let head = response.split("\r\n\r\n").next().unwrap_or("");
    if !head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        return body;
    }
    let mut out = String::new();
    let mut rest = body.as_str();
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if size == 0 || after.len() < size {
            break;
        }
        out.push_str(&after[..size]);
        rest = after[size..].trim_start_matches("\r\n");
    }
    out
}

fn base64(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, &b)| n | u32::from(b) << (16 - 8 * i));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(TABLE[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_pads_as_the_standard_says() {
        assert_eq!(super::base64(b"guest:guest"), "Z3Vlc3Q6Z3Vlc3Q=");
        assert_eq!(super::base64(b"ab"), "YWI=");
        assert_eq!(super::base64(b"abc"), "YWJj");
    }
}
