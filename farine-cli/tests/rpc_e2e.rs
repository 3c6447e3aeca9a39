//! End to end: the real `farine --start=rpc` process, called by the typed client and by a
//! hand-written AMQP client that follows only `docs/rpc-protocol.md`.

mod common;

use common::{BOUND, START_BOUND, start_rpc, workspace};
use std::process::Command;
use std::time::{Duration, Instant};

use farine::rpc::{Client, RpcError, StreamExt};
use farine_test_support::Broker;
use farine_test_support::process::{Process, SIGTERM};
use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::types::ShortString;
use lapin::{BasicProperties, Confirmation};
use rpc::ServerApiClient;
use serde_json::{Value, json};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_rpc_answers_the_typed_client() {
    let broker = Broker::connect().await;
    let mut process = start_rpc(&broker);
    let server = ServerApiClient::connect(&broker.uri(), Duration::from_secs(30))
        .await
        .unwrap();

    assert_eq!(server.repeat("abc".into(), 3).await.unwrap(), "abcabcabc");
    let counted: Vec<u32> = server
        .count(3)
        .await
        .unwrap()
        .map(Result::unwrap)
        .collect()
        .await;
    assert_eq!(counted, vec![0, 1, 2]);
    let error = server.fail("boom".into()).await.unwrap_err();
    assert!(error.to_string().contains("boom"), "{error}");

    // Known from the broker's answer, well before the client's 30-second timeout.
    let started = Instant::now();
    let error = server
        .client()
        .call::<Value>("nosuchmethod", ())
        .await
        .unwrap_err();
    assert!(matches!(error, RpcError::NoSuchMethod { .. }), "{error}");
    assert!(started.elapsed() < Duration::from_secs(15));

    // A call gives up at its own timeout, long before the reply would come.
    let started = Instant::now();
    let error = server
        .with_timeout(Duration::from_secs(1))
        .sleep(5000)
        .await
        .unwrap_err();
    let elapsed = started.elapsed();
    assert!(matches!(error, RpcError::Timeout { .. }), "{error}");
    assert!(
        elapsed >= Duration::from_secs(1) && elapsed < Duration::from_secs(5),
        "{elapsed:?}"
    );

    let calls = (0..64u32).map(|n| {
        let server = server.clone();
        async move { (n, server.repeat(format!("{n}-"), 2).await) }
    });
    for (n, answer) in join_all(calls).await {
        assert_eq!(answer.unwrap(), format!("{n}-{n}-"), "no crossed replies");
    }

    // Service `client` calls `server` through its injected, typed client.
    let via_client = Client::connect(&broker.uri(), "client", Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(
        via_client.call::<String>("shout", ("abc",)).await.unwrap(),
        "ABCABC"
    );
    assert_eq!(
        via_client
            .call::<Vec<u32>>("count_on_server", (4,))
            .await
            .unwrap(),
        vec![0, 1, 2, 3]
    );

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

/// A client written from `docs/rpc-protocol.md` alone.
struct HandWritten {
    _connection: lapin::Connection,
    channel: lapin::Channel,
    reply_to: ShortString,
    replies: lapin::Consumer,
    next_id: u32,
}

enum Sent {
    Returned,
    Replies(Vec<Value>),
}

impl HandWritten {
    async fn connect(broker: &Broker) -> Self {
        let connection = lapin::Connection::connect(&broker.uri(), Default::default())
            .await
            .unwrap();
        let channel = connection.create_channel().await.unwrap();
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .unwrap();
        let (reply_to, replies) = farine_test_support::reply_queue(&channel).await;
        Self {
            _connection: connection,
            channel,
            reply_to,
            replies,
            next_id: 0,
        }
    }

    /// Publishes a call with `mandatory`, then reads its replies until the end marker or an
    /// error reply.
    async fn call(&mut self, service: &str, method: &str, body: Value) -> Sent {
        self.next_id += 1;
        let id = format!("hand-{}", self.next_id);
        let confirm = self
            .channel
            .basic_publish(
                service.into(),
                format!("{service}__{method}").as_str().into(),
                BasicPublishOptions {
                    mandatory: true,
                    ..Default::default()
                },
                &serde_json::to_vec(&body).unwrap(),
                BasicProperties::default()
                    .with_reply_to(self.reply_to.clone())
                    .with_correlation_id(id.as_str().into())
                    .with_content_type("application/json".into()),
            )
            .await
            .unwrap()
            .await
            .unwrap();
        if let Confirmation::Ack(Some(_)) = confirm {
            return Sent::Returned;
        }
        let mut replies = Vec::new();
        loop {
            let delivery = tokio::time::timeout(BOUND, self.replies.next())
                .await
                .expect("a reply in time")
                .unwrap()
                .unwrap();
            if delivery
                .properties
                .correlation_id()
                .as_ref()
                .map(|c| c.as_str())
                != Some(id.as_str())
            {
                continue;
            }
            let reply: Value = serde_json::from_slice(&delivery.data).unwrap();
            let last =
                reply.get("__end__") == Some(&json!(true)) || reply.get("__except__").is_some();
            replies.push(reply);
            if last {
                return Sent::Replies(replies);
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn farine_start_rpc_answers_a_hand_written_client_following_the_doc() {
    let broker = Broker::connect().await;
    let mut process = start_rpc(&broker);
    let mut hand = HandWritten::connect(&broker).await;

    let Sent::Replies(replies) = hand
        .call(
            "server",
            "repeat",
            json!({"args": ["abc", 3], "kwargs": {}}),
        )
        .await
    else {
        panic!("repeat is served")
    };
    assert_eq!(
        replies,
        vec![
            json!({"body": "abcabcabc", "__end__": false}),
            json!({"__end__": true})
        ]
    );

    let Sent::Replies(replies) = hand.call("server", "count", json!({"args": [3]})).await else {
        panic!("count is served")
    };
    let bodies: Vec<_> = replies.iter().map(|r| r.get("body").cloned()).collect();
    assert_eq!(
        bodies,
        vec![Some(json!(0)), Some(json!(1)), Some(json!(2)), None]
    );

    let Sent::Replies(replies) = hand
        .call("server", "fail", json!({"kwargs": {"message": "boom"}}))
        .await
    else {
        panic!("fail is served")
    };
    assert!(replies[0]["__except__"].as_str().unwrap().contains("boom"));

    // The broker returns a request no queue is bound for: known from the return, no timeout.
    assert!(matches!(
        hand.call("server", "nosuchmethod", json!({})).await,
        Sent::Returned
    ));

    let Sent::Replies(replies) = hand.call("server", "sleep", json!({"args": [10]})).await else {
        panic!("sleep is served")
    };
    assert_eq!(replies[0], json!({"body": 10, "__end__": false}));

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    assert_eq!(status.code(), Some(0), "{}", process.output());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_a_section_is_skipped_with_a_log_line_and_the_others_start() {
    let broker = Broker::connect().await;
    // The rpc example has two services, `server` and `client`; the file configures one.
    let ini = farine_test_support::IniFile::new(&format!(
        "[DEFAULT]\namqp_uri = {}\n\n[server]\n",
        broker.uri()
    ));
    let mut command = Command::new(env!("CARGO_BIN_EXE_farine"));
    command
        .args(["--start=rpc", "--config"])
        .arg(&ini.path)
        .current_dir(workspace())
        .env("RUST_LOG", "info");
    let mut process = Process::spawn(command);
    assert!(
        process.wait_for_output("serving RPC", START_BOUND),
        "{}",
        process.output()
    );
    let server = ServerApiClient::connect(&broker.uri(), Duration::from_secs(30))
        .await
        .unwrap();
    assert_eq!(server.repeat("ab".into(), 2).await.unwrap(), "abab");

    process.signal(SIGTERM);
    let status = process.wait_exit(BOUND).expect("exits after SIGTERM");
    let output = process.output();
    assert_eq!(status.code(), Some(0), "{output}");
    let skipped: Vec<_> = output
        .lines()
        .filter(|line| line.contains("has no section [client]"))
        .collect();
    assert_eq!(
        skipped.len(),
        1,
        "one line names the skipped service:\n{output}"
    );
    assert!(skipped[0].contains("not started"), "{output}");
    assert!(
        !output.contains("has no section [server]"),
        "the configured service was started:\n{output}"
    );
}
