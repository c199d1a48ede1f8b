//! A TCP proxy that adds latency, not a bandwidth cap: benches/peers.sh puts it in front of
//! Garage to compare mounts over a "WAN" on one machine.
//!
//!   cargo run --release --example delay_proxy -- LISTEN_ADDR TARGET_ADDR DELAY_MS
//!
//! Every chunk read from either side reaches the other side DELAY_MS later (so a request and
//! its answer cost 2 x DELAY_MS, one round trip), and a new connection first waits one round
//! trip, as a TCP handshake over that link would. Each direction is a queue of (deadline,
//! bytes) drained by its own writer, so many chunks are in flight at once. The first line on
//! stdout is the bound address, so `127.0.0.1:0` works. An EOF from one side becomes a
//! shutdown of the write side towards the other, once every chunk queued before it is sent.

use std::time::Duration;

use anyhow::{Context, Result, bail};
use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::{Instant, sleep, sleep_until};

/// Bytes asked for by one read.
const CHUNK: usize = 64 * 1024;
/// Chunks queued per direction before the reader waits: up to 64 MiB in flight, far more than
/// one delay's worth of what a benchmark moves here, so the queue bounds memory, not speed.
const IN_FLIGHT: usize = 1024;
/// How much earlier than its deadline a sleep is set to end: tokio's timer is late by up to
/// about this much (see the writer in `pipe`).
const TICK_SLACK: Duration = Duration::from_millis(1);

#[tokio::main]
async fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [listen, target, delay_ms] = args.as_slice() else {
        bail!("usage: delay_proxy LISTEN_ADDR TARGET_ADDR DELAY_MS");
    };
    let delay = Duration::from_millis(delay_ms.parse().context("DELAY_MS must be a whole number")?);
    let listener = TcpListener::bind(listen).await.with_context(|| format!("cannot listen on {listen}"))?;
    println!("{}", listener.local_addr()?);
    loop {
        let client = match listener.accept().await {
            Ok((client, _)) => client,
            Err(e) => {
                // EMFILE and the like: keep serving the connections already open.
                eprintln!("delay_proxy: accept: {e}");
                sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let target = target.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(client, &target, delay).await {
                eprintln!("delay_proxy: {e:#}");
            }
        });
    }
}

/// Joins one client to a new connection to the target, a delayed pipe each way.
async fn serve(client: TcpStream, target: &str, delay: Duration) -> Result<()> {
    sleep((2 * delay).saturating_sub(TICK_SLACK)).await; // the handshake's round trip
    let server = TcpStream::connect(target).await.with_context(|| format!("cannot connect to {target}"))?;
    // Without these, Nagle would hold small chunks back on top of the delay.
    client.set_nodelay(true)?;
    server.set_nodelay(true)?;
    let (client_r, client_w) = client.into_split();
    let (server_r, server_w) = server.into_split();
    tokio::join!(pipe(client_r, server_w, delay), pipe(server_r, client_w, delay));
    Ok(())
}

/// Copies `from` to `to`, each chunk written `delay` after it was read.
async fn pipe(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, delay: Duration) {
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(IN_FLIGHT);
    let writer = async move {
        while let Some((deadline, chunk)) = rx.recv().await {
            // tokio's timer counts whole milliseconds and rounds a deadline up, so a plain
            // sleep_until made every hop 1 to 2 ms late (a request through a 2 x 20 ms proxy
            // took 42.6 ms, and 2.2 ms with DELAY_MS 0). Aim one tick early, and do not sleep
            // at all once the deadline has passed: now 40.6 ms, and 0.1 ms with DELAY_MS 0.
            let early = deadline.checked_sub(TICK_SLACK).unwrap_or(deadline);
            if early > Instant::now() {
                sleep_until(early).await;
            }
            if to.write_all(&chunk).await.is_err() {
                return; // the receiver is gone; dropping rx stops the reader at its next chunk
            }
        }
        // The source reached EOF and everything read before it has been written.
        let _ = to.shutdown().await;
    };
    let reader = async move {
        let mut buf = vec![0; CHUNK];
        // A read error ends the stream as an EOF would.
        while let Ok(n @ 1..) = from.read(&mut buf).await {
            let chunk = Bytes::copy_from_slice(&buf[..n]);
            if tx.send((Instant::now() + delay, chunk)).await.is_err() {
                break;
            }
        }
    };
    tokio::join!(reader, writer);
}
