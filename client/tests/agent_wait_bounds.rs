//! The plant agent's waits on the coordinator are bounded (issue 8, "every await has a
//! bound"): a real coordinator over mutual TLS on loopback behind the coordinator tests'
//! `FaultProxy`, stalled so that it accepts TCP but answers nothing, not even the TLS
//! handshake. tonic's own connect timeout covers only the TCP connect; the agent's
//! `connect_timeout_secs` covers the handshake too, so the agent gives up the attempt, says
//! why, retries, and registers once the stall ends.

#[allow(dead_code)] // the coordinator tests' proxy; only its stall is used here
#[path = "../../coordinator/tests/support/fault_proxy.rs"]
mod fault_proxy;
mod federation_site;

use std::time::Duration;

use fault_proxy::FaultProxy;
use federation_site::*;
use fedinspect_client::agent::rpc::{self, Bounds, RpcError};
use fedinspect_client::agent::{Agent, Event};
use fedinspect_coordinator::config::Limits;
use tokio::sync::watch;

/// Longer than any bound the test sets: a stalled attempt ends by its bound, never by this.
const STALL: Duration = Duration::from_secs(600);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_coordinator_that_never_answers_the_handshake_is_given_up_on_and_retried() {
    let site = Site::new(1);
    let running = site.start(policy(1, 120, 1), Limits::default()).await;
    let proxy = FaultProxy::start(running.local_addr()).await;
    proxy.stall_for(STALL);

    // One connection attempt: TCP is accepted by the proxy, the handshake never answered.
    let config = site.plant(1, &proxy.url(), "");
    let bounds = Bounds {
        connect: Duration::from_secs(1),
        ..Bounds::default()
    };
    let attempt = tokio::time::timeout(
        Duration::from_secs(30),
        rpc::connect_with(&config.coordinator, &config.tls, bounds),
    )
    .await
    .expect("the attempt ended by its own bound");
    let e = match attempt {
        Err(e) => e,
        Ok(_) => panic!("connected through a stalled proxy"),
    };
    println!("one attempt against a stalled coordinator: {e}");
    assert!(matches!(e, RpcError::TimedOut { .. }), "{e:?}");
    assert!(e.is_transient(), "the agent retries it");
    assert!(e.to_string().contains("connect_timeout_secs"), "{e}");
    assert!(proxy.counts().accepted >= 1, "TCP was accepted");

    // The agent: its attempts time out and are retried until the stall ends.
    let agent_toml = "backoff_initial_ms = 100\nbackoff_max_secs = 1\ndeadline_margin_secs = 1\n\
                      connect_timeout_secs = 1";
    let mut agent = Agent::build(site.plant(1, &proxy.url(), agent_toml)).unwrap();
    let mut events = agent.events();
    let (stop, stopped) = watch::channel(false);
    let task = tokio::spawn(agent.run(stopped));
    let mut failed = Vec::new();
    while failed.len() < 2 {
        match next_event_within(&mut events, Duration::from_secs(30)).await {
            Event::Disconnected { reason } => failed.push(reason),
            other => panic!("expected the attempt to fail while stalled, got {other:?}"),
        }
    }
    for reason in &failed {
        println!("agent attempt failed: {reason}");
        assert!(reason.contains("connect_timeout_secs"), "{reason}");
    }
    let accepted_while_stalled = proxy.counts().accepted;
    proxy.stall_for(Duration::ZERO);
    let registered = loop {
        match next_event_within(&mut events, Duration::from_secs(30)).await {
            Event::Registered { plant_id, .. } => break plant_id,
            Event::Disconnected { reason } => failed.push(reason),
            _ => {}
        }
    };
    println!(
        "registered as {registered} after {} failed attempts; the proxy accepted {} connections while stalled",
        failed.len(),
        accepted_while_stalled
    );
    assert_eq!(registered, "plant-1");
    assert!(accepted_while_stalled >= 3, "one per attempt");
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(30), task)
        .await
        .expect("the agent stops")
        .unwrap()
        .unwrap();
    running.stop(Duration::from_secs(10)).await.unwrap();
}

/// The next event within `wait`.
async fn next_event_within(
    rx: &mut tokio::sync::mpsc::UnboundedReceiver<Event>,
    wait: Duration,
) -> Event {
    tokio::time::timeout(wait, rx.recv())
        .await
        .expect("an event within the wait")
        .expect("the agent is running")
}
