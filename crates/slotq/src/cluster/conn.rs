//! One connection to one node: a writer task that coalesces queued requests into large
//! writes, a reader task that parses replies and hands them to their callers in order.
//! Any number of callers share it; their commands are pipelined.
//!
//! The connection speaks RESP2 over TCP or TLS, authenticates with `AUTH` when the URL
//! carries credentials, and checks with `PING` that the peer speaks Redis at all.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use redis::Value;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};

use super::resp::{self, Reply};
use super::wire::{self, Wire};
use crate::error::{Cause, Error};
use crate::topology::NodeAddr;

/// Writes are coalesced up to this many bytes.
const MAX_WRITE: usize = 1 << 20;
/// Initial read buffer.
const READ_BUFFER: usize = 64 * 1024;

/// How to reach and log in to nodes.
#[derive(Clone)]
pub(crate) struct Dialer {
    pub(crate) tls: Option<Arc<rustls::ClientConfig>>,
    pub(crate) username: Option<String>,
    pub(crate) password: Option<String>,
    pub(crate) connect_timeout: Duration,
    /// The local address connections are made from (`ClusterConfig::source_address`).
    pub(crate) source: Option<std::net::IpAddr>,
}

/// Why a request got no reply: what happened, and the I/O error behind it if any.
#[derive(Debug, Clone)]
pub(crate) struct Broken(pub(crate) String, pub(crate) Option<Cause>);

impl Broken {
    fn closed() -> Broken {
        Broken("connection closed".into(), None)
    }
}

struct Request {
    parts: Vec<Bytes>,
    replies: usize,
    items: bool,
    tx: oneshot::Sender<Result<Vec<Reply>, Broken>>,
}

struct Waiting {
    replies: usize,
    /// Arrays of bulk strings come back as [`Reply::Items`].
    items: bool,
    got: Vec<Reply>,
    tx: oneshot::Sender<Result<Vec<Reply>, Broken>>,
}

struct Shared {
    waiting: Mutex<VecDeque<Waiting>>,
    closed: AtomicBool,
}

impl Shared {
    fn fail_all(&self, why: &str) {
        self.fail_with(Broken(why.to_string(), None));
    }

    fn fail_io(&self, e: std::io::Error) {
        self.fail_with(Broken(e.to_string(), Some(Cause::new(e))));
    }

    /// Whether the request the next reply belongs to wants arrays as items.
    fn front_wants_items(&self) -> bool {
        self.waiting
            .lock()
            .unwrap()
            .front()
            .is_some_and(|w| w.items)
    }

    fn fail_with(&self, broken: Broken) {
        self.closed.store(true, Ordering::Release);
        let waiting: Vec<Waiting> = self.waiting.lock().unwrap().drain(..).collect();
        for w in waiting {
            let _ = w.tx.send(Err(broken.clone()));
        }
    }
}

/// A shared, pipelined connection; cheap to clone.
#[derive(Clone)]
pub(crate) struct Conn {
    tx: mpsc::UnboundedSender<Request>,
    shared: Arc<Shared>,
}

type ReadHalf = Box<dyn AsyncRead + Unpin + Send>;
type WriteHalf = Box<dyn AsyncWrite + Unpin + Send>;

impl Dialer {
    /// A TCP connection to `node`, from the configured source address if there is one.
    async fn connect_tcp(&self, node: &NodeAddr) -> std::io::Result<TcpStream> {
        let Some(source) = self.source else {
            return TcpStream::connect((node.host.as_str(), node.port)).await;
        };
        let mut last = None;
        for addr in tokio::net::lookup_host((node.host.as_str(), node.port)).await? {
            if addr.is_ipv4() != source.is_ipv4() {
                continue;
            }
            let socket = if addr.is_ipv4() {
                tokio::net::TcpSocket::new_v4()?
            } else {
                tokio::net::TcpSocket::new_v6()?
            };
            socket.bind(std::net::SocketAddr::new(source, 0))?;
            match socket.connect(addr).await {
                Ok(s) => return Ok(s),
                Err(e) => last = Some(e),
            }
        }
        Err(last.unwrap_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::AddrNotAvailable,
                format!("no address of {node} in the family of the source address {source}"),
            )
        }))
    }

    /// Connects, upgrades to TLS if configured, authenticates, and checks the protocol.
    pub(crate) async fn dial(&self, node: &NodeAddr) -> Result<Conn, Error> {
        let connect_err = |reason: String, cause: Option<Cause>| Error::Connect {
            node: node.clone(),
            reason,
            cause,
        };
        let tcp = match tokio::time::timeout(self.connect_timeout, self.connect_tcp(node)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(connect_err(e.to_string(), Some(Cause::new(e)))),
            Err(_) => {
                return Err(connect_err(
                    format!("no connection within {:?}", self.connect_timeout),
                    None,
                ));
            }
        };
        let _ = tcp.set_nodelay(true);
        // A connection given up on (a request timed out, a node cut off) is reset, not
        // closed gracefully: with a zero linger, closing discards what the kernel still
        // holds unsent and sends RST, so a request abandoned during a partition is never
        // delivered, and run, after the network heals.
        let _ = socket2::SockRef::from(&tcp).set_linger(Some(Duration::ZERO));
        // A TCP stream splits into halves that need no lock: its reader and writer tasks,
        // often on two threads, never wait for each other. A TLS stream is one state
        // machine, split behind a lock.
        let (reader, writer): (ReadHalf, WriteHalf) = match &self.tls {
            None => {
                let (r, w) = tcp.into_split();
                (Box::new(r), Box::new(w))
            }
            Some(cfg) => {
                let name =
                    rustls::pki_types::ServerName::try_from(node.host.clone()).map_err(|e| {
                        Error::Tls {
                            node: node.clone(),
                            reason: format!("bad server name: {e}"),
                            cause: Some(Cause::new(e)),
                        }
                    })?;
                let connector = tokio_rustls::TlsConnector::from(cfg.clone());
                match tokio::time::timeout(self.connect_timeout, connector.connect(name, tcp)).await
                {
                    Ok(Ok(s)) => {
                        let (r, w) = tokio::io::split(s);
                        (Box::new(r), Box::new(w))
                    }
                    Ok(Err(e)) => {
                        return Err(Error::Tls {
                            node: node.clone(),
                            reason: e.to_string(),
                            cause: Some(Cause::new(e)),
                        });
                    }
                    Err(_) => {
                        return Err(Error::Tls {
                            node: node.clone(),
                            reason: format!("no TLS handshake within {:?}", self.connect_timeout),
                            cause: None,
                        });
                    }
                }
            }
        };
        let conn = Conn::start(reader, writer);
        let handshake = async {
            if let Some(password) = &self.password {
                let mut auth = redis::cmd("AUTH");
                if let Some(user) = &self.username {
                    auth.arg(user);
                }
                auth.arg(password);
                match conn.cmd(&auth).await {
                    Ok(Value::ServerError(e)) => {
                        return Err(Error::Auth {
                            node: node.clone(),
                            reason: format!("{} {}", e.code(), e.details().unwrap_or_default()),
                        });
                    }
                    Ok(_) => {}
                    Err(b) => return Err(not_redis(node, &b)),
                }
            }
            match conn.cmd(&redis::cmd("PING")).await {
                Ok(Value::ServerError(e))
                    if crate::server_error::ServerErrorKind::parse(e.code()).is_auth() =>
                {
                    Err(Error::Auth {
                        node: node.clone(),
                        reason: format!("{} {}", e.code(), e.details().unwrap_or_default()),
                    })
                }
                Ok(Value::SimpleString(s)) if s == "PONG" => Ok(()),
                Ok(other) => Err(connect_err(
                    format!("unexpected reply to PING: {other:?}"),
                    None,
                )),
                Err(b) => Err(not_redis(node, &b)),
            }
        };
        match tokio::time::timeout(self.connect_timeout, handshake).await {
            Ok(Ok(())) => Ok(conn),
            Ok(Err(e)) => Err(e),
            Err(_) => Err(connect_err(
                format!("no handshake within {:?}", self.connect_timeout),
                None,
            )),
        }
    }
}

fn not_redis(node: &NodeAddr, b: &Broken) -> Error {
    Error::Connect {
        node: node.clone(),
        reason: format!("the server did not answer in the Redis protocol ({})", b.0),
        cause: b.1.clone(),
    }
}

impl Conn {
    fn start(mut reader: ReadHalf, mut writer: WriteHalf) -> Conn {
        let (tx, mut rx) = mpsc::unbounded_channel::<Request>();
        let shared = Arc::new(Shared {
            waiting: Mutex::new(VecDeque::new()),
            closed: AtomicBool::new(false),
        });

        let rshared = shared.clone();
        let read_task = tokio::spawn(async move {
            let mut buf = BytesMut::with_capacity(READ_BUFFER);
            // Where the reply at the front of `buf` ends, found once however many reads
            // it takes to arrive; it is parsed only when whole.
            let mut scanner = resp::Scanner::default();
            loop {
                match reader.read_buf(&mut buf).await {
                    Ok(0) => return rshared.fail_all("connection closed by the server"),
                    Ok(_) => {}
                    Err(e) => return rshared.fail_io(e),
                }
                let mut used = 0;
                loop {
                    // Walk to the end of the reply first (cheap, resumable, allocates
                    // nothing), parse it once it is whole: a large pop reply arrives over
                    // several reads, and parsing it on each would build and drop most of
                    // its values each time.
                    let whole = match scanner.scan(&buf[used..]) {
                        Ok(Some(n)) => n,
                        Ok(None) => break,
                        Err(e) => return rshared.fail_all(&e.0),
                    };
                    let reply = if rshared.front_wants_items() {
                        // Cut the reply out of the buffer (no copy): its payloads keep
                        // their slices of it, and the reader goes on in fresh room.
                        buf.advance(used);
                        used = 0;
                        let reply = buf.split_to(whole).freeze();
                        if scanner.found_items() {
                            // The walk noted where its strings lie: nothing to parse.
                            Ok(scanner.take_items(reply))
                        } else {
                            resp::parse_items(reply)
                        }
                    } else {
                        match resp::parse(&buf[used..used + whole]) {
                            Ok(Some((v, n))) => {
                                used += n;
                                Ok(Reply::Value(v))
                            }
                            Ok(None) => {
                                Err(resp::ProtocolError("reply shorter than announced".into()))
                            }
                            Err(e) => Err(e),
                        }
                    };
                    match reply {
                        Ok(reply) => {
                            if !deliver(&rshared, reply) {
                                return rshared.fail_all("reply without a request");
                            }
                        }
                        Err(e) => return rshared.fail_all(&e.0),
                    }
                }
                buf.advance(used);
                if buf.capacity() - buf.len() < READ_BUFFER / 4 {
                    // A large reply is arriving: grow so that it is parsed in few passes.
                    buf.reserve(buf.len().max(READ_BUFFER));
                }
            }
        });

        let wshared = shared.clone();
        tokio::spawn(async move {
            // The parts of the requests queued together, written at once up to MAX_WRITE.
            let mut parts: Vec<Bytes> = Vec::new();
            let mut scratch: Vec<u8> = Vec::with_capacity(64 * 1024);
            // Registers the request as waiting for its replies (before any of it is
            // written: replies are matched in that order); gathers its parts.
            let register = |r: Request, parts: &mut Vec<Bytes>| {
                wshared.waiting.lock().unwrap().push_back(Waiting {
                    replies: r.replies,
                    items: r.items,
                    got: Vec::with_capacity(r.replies),
                    tx: r.tx,
                });
                let size: usize = r.parts.iter().map(Bytes::len).sum();
                parts.extend(r.parts);
                size
            };
            while let Some(first) = rx.recv().await {
                let mut size = register(first, &mut parts);
                while size < MAX_WRITE {
                    match rx.try_recv() {
                        Ok(r) => size += register(r, &mut parts),
                        Err(_) => break,
                    }
                }
                write_pending(&mut writer, &wshared, &parts, &mut scratch).await;
                // Written: the producers' buffers go now, not at the next write.
                parts.clear();
            }
            // Every handle is gone: close the socket and stop reading.
            let _ = writer.shutdown().await;
            read_task.abort();
        });
        Conn { tx, shared }
    }

    /// Whether the connection broke (it will never answer again).
    pub(crate) fn is_closed(&self) -> bool {
        self.shared.closed.load(Ordering::Acquire)
    }

    /// Sends packed commands and waits for `replies` replies (in order).
    pub(crate) async fn exec(
        &self,
        bytes: impl Into<Wire>,
        replies: usize,
    ) -> Result<Vec<Value>, Broken> {
        let got = self.exec_replies(bytes, replies, false).await?;
        Ok(got.into_iter().map(Reply::into_value).collect())
    }

    /// Sends packed commands and waits for `replies` replies (in order); with `items`,
    /// arrays of bulk strings come back as slices of the read buffer ([`Reply::Items`]).
    pub(crate) async fn exec_replies(
        &self,
        bytes: impl Into<Wire>,
        replies: usize,
        items: bool,
    ) -> Result<Vec<Reply>, Broken> {
        if self.is_closed() {
            return Err(Broken::closed());
        }
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Request {
                parts: bytes.into().into_parts(),
                replies,
                items,
                tx,
            })
            .map_err(|_| Broken::closed())?;
        rx.await.map_err(|_| Broken::closed())?
    }

    /// Sends one command and waits for its reply.
    pub(crate) async fn cmd(&self, cmd: &redis::Cmd) -> Result<Value, Broken> {
        let mut v = self.exec(cmd.get_packed_command(), 1).await?;
        Ok(v.pop().unwrap_or(Value::Nil))
    }
}

/// Writes what was queued, unless the connection broke (then every waiting request fails).
async fn write_pending(
    writer: &mut WriteHalf,
    shared: &Shared,
    parts: &[Bytes],
    scratch: &mut Vec<u8>,
) {
    if shared.closed.load(Ordering::Acquire) {
        shared.fail_all("connection closed");
        return;
    }
    if let Err(e) = wire::write_parts(writer, parts, scratch).await {
        shared.fail_all(&e.to_string());
    }
}

/// Hands a reply to the oldest request still waiting; false if none waits.
fn deliver(shared: &Shared, v: Reply) -> bool {
    let mut waiting = shared.waiting.lock().unwrap();
    let Some(front) = waiting.front_mut() else {
        return false;
    };
    front.got.push(v);
    if front.got.len() >= front.replies {
        let done = waiting.pop_front().expect("front exists");
        drop(waiting);
        let _ = done.tx.send(Ok(done.got));
    }
    true
}

/// The TLS settings for `rediss://`: the given CA, else the platform's roots.
pub(crate) fn tls_config(root_pem: Option<&[u8]>) -> Result<Arc<rustls::ClientConfig>, Error> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match root_pem {
        Some(pem) => {
            for cert in CertificateDer::pem_slice_iter(pem) {
                let cert = cert.map_err(|e| Error::Config(format!("TLS root certificate: {e}")))?;
                roots
                    .add(cert)
                    .map_err(|e| Error::Config(format!("TLS root certificate: {e}")))?;
            }
            if roots.is_empty() {
                return Err(Error::Config(
                    "TLS root certificate: no certificate in the PEM".into(),
                ));
            }
        }
        None => {
            for cert in rustls_native_certs::load_native_certs().certs {
                let _ = roots.add(cert);
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let cfg = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::Config(format!("TLS: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(cfg))
}
