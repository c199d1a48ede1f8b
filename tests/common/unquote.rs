//! A loopback HTTP proxy in front of an S3 server that takes the quotes off the ETags it
//! answers, as some S3-compatible servers send them: in the `<ETag>` elements of XML answers
//! (listings, copy results), and in `ETag` headers too unless told otherwise. Requests pass
//! through unchanged, so their signatures still hold; each goes upstream on a connection of
//! its own.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// Where the proxy takes the quotes off.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unquote {
    /// Headers and XML: a server that never quotes.
    Everywhere,
    /// XML only: a server whose listings disagree with its headers.
    InXmlOnly,
}

/// The proxy; dropping it stops accepting connections.
pub struct UnquotingProxy {
    pub port: u16,
    stop: Arc<AtomicBool>,
    counts: Arc<Counts>,
    thread: Option<JoinHandle<()>>,
}

#[derive(Default)]
struct Counts {
    headers: AtomicUsize,
    xml: AtomicUsize,
}

impl UnquotingProxy {
    /// Listens on a free loopback port and forwards to `127.0.0.1:upstream`.
    pub fn start(upstream: u16, mode: Unquote) -> UnquotingProxy {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the proxy");
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let counts = Arc::new(Counts::default());
        let (stop2, counts2) = (stop.clone(), counts.clone());
        let thread = std::thread::spawn(move || {
            for conn in listener.incoming() {
                if stop2.load(Ordering::SeqCst) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let counts = counts2.clone();
                std::thread::spawn(move || {
                    let _ = serve(conn, upstream, mode, &counts);
                });
            }
        });
        UnquotingProxy { port, stop, counts, thread: Some(thread) }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// How many quoted ETags it unquoted so far: (in headers, in XML bodies).
    pub fn unquoted(&self) -> (usize, usize) {
        (self.counts.headers.load(Ordering::SeqCst), self.counts.xml.load(Ordering::SeqCst))
    }
}

impl Drop for UnquotingProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect(("127.0.0.1", self.port));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// One HTTP/1.1 message: the start line, the header lines, the body.
struct Message {
    start: String,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Message {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    fn without(mut self, names: &[&str]) -> Self {
        self.headers.retain(|(k, _)| !names.iter().any(|n| k.eq_ignore_ascii_case(n)));
        self
    }

    fn to_bytes(&self) -> Vec<u8> {
        let mut out = format!("{}\r\n", self.start);
        for (k, v) in &self.headers {
            out.push_str(&format!("{k}: {v}\r\n"));
        }
        out.push_str("\r\n");
        let mut out = out.into_bytes();
        out.extend_from_slice(&self.body);
        out
    }
}

/// Serves one client connection: requests one after another (keep-alive), until it closes.
fn serve(mut client: TcpStream, upstream: u16, mode: Unquote, counts: &Counts) -> io::Result<()> {
    client.set_read_timeout(Some(Duration::from_secs(300)))?;
    let mut pending = Vec::new();
    loop {
        let Some(req) = read_request(&mut client, &mut pending)? else { return Ok(()) };
        let head = req.start.starts_with("HEAD ");
        let has_query = req.start.split(' ').nth(1).is_some_and(|target| target.contains('?'));
        let mut req = req.without(&["connection"]);
        req.headers.push(("Connection".into(), "close".into()));

        let mut up = TcpStream::connect(("127.0.0.1", upstream))?;
        up.set_read_timeout(Some(Duration::from_secs(300)))?;
        up.write_all(&req.to_bytes())?;
        let mut raw = Vec::new();
        up.read_to_end(&mut raw)?;
        let mut resp = parse_response(&raw, head)?;

        for (k, v) in &mut resp.headers {
            let quoted = v.len() >= 2 && v.starts_with('"') && v.ends_with('"');
            if mode == Unquote::Everywhere && k.eq_ignore_ascii_case("etag") && quoted {
                *v = v[1..v.len() - 1].to_string();
                counts.headers.fetch_add(1, Ordering::SeqCst);
            }
        }
        let xml = resp.header("content-type").is_some_and(|t| t.contains("xml"));
        if has_query && xml && !head {
            let (body, n) = unquote_xml_etags(&resp.body);
            resp.body = body;
            counts.xml.fetch_add(n, Ordering::SeqCst);
        }
        let mut resp = resp.without(&["connection", "transfer-encoding"]);
        let status: u16 = resp.start.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
        if !head && status != 204 && status != 304 {
            resp = resp.without(&["content-length"]);
            resp.headers.push(("Content-Length".into(), resp.body.len().to_string()));
        }
        client.write_all(&resp.to_bytes())?;
    }
}

/// Reads one request from `conn` (`pending` holds bytes already read past the last one);
/// `None` when the client closed the connection between requests.
fn read_request(conn: &mut TcpStream, pending: &mut Vec<u8>) -> io::Result<Option<Message>> {
    let mut buf = [0u8; 64 << 10];
    let end = loop {
        if let Some(i) = pending.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        let n = conn.read(&mut buf)?;
        if n == 0 {
            if pending.is_empty() {
                return Ok(None);
            }
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request cut short"));
        }
        pending.extend_from_slice(&buf[..n]);
    };
    let (start, headers) = parse_head(&pending[..end])?;
    let mut msg = Message { start, headers, body: Vec::new() };
    if msg.header("transfer-encoding").is_some() {
        // object_store sends every body with a Content-Length.
        let _ = conn.shutdown(Shutdown::Both);
        return Err(io::Error::other("chunked requests are not supported"));
    }
    let len: usize = msg.header("content-length").and_then(|v| v.trim().parse().ok()).unwrap_or(0);
    pending.drain(..end + 4);
    while pending.len() < len {
        let n = conn.read(&mut buf)?;
        if n == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "request body cut short"));
        }
        pending.extend_from_slice(&buf[..n]);
    }
    msg.body = pending.drain(..len).collect();
    Ok(Some(msg))
}

fn parse_head(head: &[u8]) -> io::Result<(String, Vec<(String, String)>)> {
    let text = std::str::from_utf8(head).map_err(|_| io::Error::other("a head that is not UTF-8"))?;
    let mut lines = text.split("\r\n");
    let start = lines.next().unwrap_or_default().to_string();
    let headers =
        lines.filter_map(|l| l.split_once(':')).map(|(k, v)| (k.trim().to_string(), v.trim().to_string())).collect();
    Ok((start, headers))
}

/// A whole response read until the server closed the connection.
fn parse_response(raw: &[u8], head: bool) -> io::Result<Message> {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| io::Error::other("a response without a blank line"))?;
    let (start, headers) = parse_head(&raw[..end])?;
    let mut msg = Message { start, headers, body: raw[end + 4..].to_vec() };
    if head {
        msg.body.clear();
    } else if msg.header("transfer-encoding").is_some_and(|t| t.eq_ignore_ascii_case("chunked")) {
        msg.body = dechunk(&msg.body)?;
    } else if let Some(len) = msg.header("content-length").and_then(|v| v.trim().parse::<usize>().ok()) {
        msg.body.truncate(len);
    }
    Ok(msg)
}

fn dechunk(mut data: &[u8]) -> io::Result<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end =
            data.windows(2).position(|w| w == b"\r\n").ok_or_else(|| io::Error::other("a chunk without a size"))?;
        let size_text = std::str::from_utf8(&data[..line_end]).map_err(|_| io::Error::other("a bad chunk size"))?;
        let size_text = size_text.split(';').next().unwrap_or_default().trim();
        let size = usize::from_str_radix(size_text, 16).map_err(|_| io::Error::other("a bad chunk size"))?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Ok(out);
        }
        if data.len() < size + 2 {
            return Err(io::Error::other("a chunk cut short"));
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// `<ETag>"X"</ETag>` and `<ETag>&quot;X&quot;</ETag>` become `<ETag>X</ETag>`; returns the
/// new body and how many it changed.
pub fn unquote_xml_etags(body: &[u8]) -> (Vec<u8>, usize) {
    let Ok(text) = std::str::from_utf8(body) else { return (body.to_vec(), 0) };
    let (mut out, mut rest, mut n) = (String::with_capacity(text.len()), text, 0);
    while let Some(i) = rest.find("<ETag>") {
        out.push_str(&rest[..i + 6]);
        rest = &rest[i + 6..];
        let Some(j) = rest.find("</ETag>") else { break };
        let value = &rest[..j];
        let bare = value
            .strip_prefix("&quot;")
            .and_then(|v| v.strip_suffix("&quot;"))
            .or_else(|| value.strip_prefix('"').and_then(|v| v.strip_suffix('"')));
        match bare {
            Some(b) => {
                out.push_str(b);
                n += 1;
            }
            None => out.push_str(value),
        }
        rest = &rest[j..];
    }
    out.push_str(rest);
    (out.into_bytes(), n)
}
