//! The control socket: how `autosync flush|status|unmount|events` reach a running mount.
//! One JSON request per connection, then one JSON reply; or, for `events`, one JSON line
//! per event for as long as the client reads.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, anyhow};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::fs::{ConflictRecord, Fs, Status};

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "cmd", rename_all = "lowercase")]
pub enum Request {
    Status,
    Flush {
        timeout_secs: f64,
    },
    Unmount,
    /// Empty the block caches (memory and disk).
    CacheClear,
    /// The conflict records.
    Conflicts,
    /// Follow the event stream: from `since` (what is still held), else from the next one.
    Events {
        #[serde(default)]
        since: Option<u64>,
    },
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    pub ok: bool,
    pub status: Option<Status>,
    pub pending: Option<usize>,
    pub error: Option<String>,
    #[serde(default)]
    pub conflicts: Option<Vec<ConflictRecord>>,
}

pub fn serve(fs: Arc<Fs>, socket: &Path, unmount: mpsc::Sender<()>) -> anyhow::Result<JoinHandle<()>> {
    let _ = std::fs::remove_file(socket);
    let listener = UnixListener::bind(socket).with_context(|| format!("cannot listen on {}", socket.display()))?;
    Ok(tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else { continue };
            let fs = Arc::clone(&fs);
            let unmount = unmount.clone();
            tokio::spawn(async move {
                if let Err(e) = handle(fs, stream, unmount).await {
                    tracing::debug!("control connection: {e}");
                }
            });
        }
    }))
}

async fn handle(fs: Arc<Fs>, stream: UnixStream, unmount: mpsc::Sender<()>) -> anyhow::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut r = BufReader::new(r);
    r.read_line(&mut line).await?;
    let reply = match serde_json::from_str::<Request>(&line) {
        Ok(Request::Events { since }) => return follow(&fs, since, r, w).await,
        Ok(Request::Status) => {
            Reply { ok: true, status: Some(fs.status()), pending: None, error: None, ..Default::default() }
        }
        Ok(Request::Flush { timeout_secs }) => {
            let left = fs.flush_all(Duration::from_secs_f64(timeout_secs.max(0.0))).await;
            let status = fs.status();
            Reply {
                ok: left == 0,
                pending: Some(left),
                error: status.last_error.clone(),
                status: Some(status),
                ..Default::default()
            }
        }
        Ok(Request::CacheClear) => match fs.clear_cache().await {
            Ok(()) => Reply { ok: true, status: Some(fs.status()), pending: None, error: None, ..Default::default() },
            Err(e) => {
                Reply { ok: false, status: None, pending: None, error: Some(e.to_string()), ..Default::default() }
            }
        },
        Ok(Request::Conflicts) => match fs.conflicts() {
            Ok(c) => Reply { ok: true, conflicts: Some(c), ..Default::default() },
            Err(e) => Reply { ok: false, error: Some(e.to_string()), ..Default::default() },
        },
        Ok(Request::Unmount) => {
            let _ = unmount.send(()).await;
            Reply { ok: true, status: None, pending: None, error: None, ..Default::default() }
        }
        Err(e) => Reply {
            ok: false,
            status: None,
            pending: None,
            error: Some(format!("bad request: {e}")),
            ..Default::default()
        },
    };
    let mut out = serde_json::to_vec(&reply)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    Ok(())
}

/// Writes every event to the client, one JSON line each, until it goes away. A client
/// that reads slowly only slows this task: the stream tells it how many events it missed.
async fn follow(
    fs: &Fs,
    since: Option<u64>,
    mut r: BufReader<tokio::net::unix::OwnedReadHalf>,
    mut w: tokio::net::unix::OwnedWriteHalf,
) -> anyhow::Result<()> {
    let mut listener = fs.events(since);
    let mut gone = [0u8; 1];
    loop {
        let event = tokio::select! {
            e = listener.next() => e,
            // The client closed its end (it sends nothing more after the request).
            _ = tokio::io::AsyncReadExt::read(&mut r, &mut gone) => return Ok(()),
        };
        let Some(event) = event else { return Ok(()) };
        let mut out = serde_json::to_vec(&*event)?;
        out.push(b'\n');
        w.write_all(&out).await?;
    }
}

/// Opens the event stream of the mount behind `socket`: lines of JSON, one per event.
pub async fn events(socket: &Path, since: Option<u64>) -> anyhow::Result<BufReader<UnixStream>> {
    let mut stream = UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow!("no running mount answers at {}: {e}", socket.display()))?;
    let mut out = serde_json::to_vec(&Request::Events { since })?;
    out.push(b'\n');
    stream.write_all(&out).await?;
    Ok(BufReader::new(stream))
}

/// Sends one request to the mount behind `socket` and waits for the reply.
pub async fn call(socket: &Path, req: &Request) -> anyhow::Result<Reply> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| anyhow!("no running mount answers at {}: {e}", socket.display()))?;
    let (r, mut w) = stream.into_split();
    let mut out = serde_json::to_vec(req)?;
    out.push(b'\n');
    w.write_all(&out).await?;
    let mut line = String::new();
    BufReader::new(r).read_line(&mut line).await?;
    serde_json::from_str(&line).context("the mount sent an unreadable reply")
}
