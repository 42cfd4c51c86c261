//! One `redis-server` process: start, kill -9, SIGSTOP/SIGCONT, restart, stop on drop.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::ports::free_port;
use crate::tls::TlsFiles;
use crate::{Result, Security, TestkitError, wait_for};

/// How long a server may take to accept connections after it was started.
pub const START_TIMEOUT: Duration = Duration::from_secs(15);

/// Settings for one server.
#[derive(Debug, Clone)]
pub struct ServerBuilder {
    pub(crate) port: Option<u16>,
    pub(crate) dir: Option<PathBuf>,
    pub(crate) cluster: bool,
    pub(crate) node_timeout_ms: u64,
    pub(crate) security: Security,
    pub(crate) tls_files: Option<TlsFiles>,
    pub(crate) extra: Vec<String>,
    pub(crate) own_group: bool,
    /// The loopback address the server binds, sends from and announces.
    pub(crate) host: String,
}

impl Default for ServerBuilder {
    fn default() -> Self {
        ServerBuilder {
            port: None,
            dir: None,
            cluster: false,
            node_timeout_ms: 2000,
            security: Security::default(),
            tls_files: None,
            extra: Vec::new(),
            own_group: false,
            host: "127.0.0.1".into(),
        }
    }
}

impl ServerBuilder {
    /// A standalone server on a free port in a temporary directory.
    pub fn new() -> Self {
        Self::default()
    }

    /// Binds, sends from (replication, cluster bus) and announces this loopback address
    /// (127.0.0.0/8 only) instead of 127.0.0.1: nodes with addresses of their own can be
    /// cut apart by address (see `slotq_tests::nft`).
    pub fn host(mut self, ip: &str) -> Self {
        assert!(ip.starts_with("127."), "loopback addresses only: {ip}");
        self.host = ip.to_string();
        self
    }

    /// Listen on this port instead of a free one.
    pub fn port(mut self, port: u16) -> Self {
        self.port = Some(port);
        self
    }

    /// Keep the server's files in `dir` (kept after drop) instead of a temporary directory.
    pub fn dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.dir = Some(dir.into());
        self
    }

    /// Require this ACL user (the default user is turned off).
    pub fn user(mut self, name: &str, password: &str) -> Self {
        self.security.user = Some((name.to_string(), password.to_string()));
        self
    }

    /// Serve TLS only, with a generated CA.
    pub fn tls(mut self) -> Self {
        self.security.tls = true;
        self
    }

    /// An extra `redis.conf` line.
    pub fn config_line(mut self, line: &str) -> Self {
        self.extra.push(line.to_string());
        self
    }

    /// Run in a process group of its own (survives Ctrl-C aimed at the starter).
    pub fn own_process_group(mut self) -> Self {
        self.own_group = true;
        self
    }

    /// Starts the server and waits until it answers PING.
    pub fn start(self) -> Result<Server> {
        if !crate::redis_server_available() {
            return Err(TestkitError::RedisServerMissing);
        }
        let (dir, tmp) = match &self.dir {
            Some(d) => {
                std::fs::create_dir_all(d)?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new().prefix("slotq-redis-").tempdir()?;
                (t.path().to_path_buf(), Some(t))
            }
        };
        let tls_files = match (&self.tls_files, self.security.tls) {
            (Some(f), _) => Some(f.clone()),
            (None, true) => Some(TlsFiles::generate(&dir)?),
            (None, false) => None,
        };
        let mut last_err = None;
        for _ in 0..5 {
            let port = self.port.unwrap_or_else(free_port);
            let mut server = Server {
                port,
                host: self.host.clone(),
                dir: dir.clone(),
                child: None,
                security: self.security.clone(),
                tls_files: tls_files.clone(),
                own_group: self.own_group,
                _tmp: None,
            };
            server.write_config(&self, port)?;
            match server.spawn() {
                Ok(()) => {
                    server._tmp = tmp;
                    return Ok(server);
                }
                Err(e) => {
                    last_err = Some(e);
                    if self.port.is_some() {
                        break;
                    }
                }
            }
        }
        Err(last_err.unwrap_or_else(|| TestkitError::Setup("could not start redis-server".into())))
    }
}

/// A running (or killed, or paused) `redis-server` process.
#[derive(Debug)]
pub struct Server {
    port: u16,
    host: String,
    dir: PathBuf,
    child: Option<Child>,
    security: Security,
    tls_files: Option<TlsFiles>,
    own_group: bool,
    _tmp: Option<tempfile::TempDir>,
}

impl Server {
    /// Starts a standalone server with default settings.
    pub fn start() -> Result<Server> {
        ServerBuilder::new().start()
    }

    /// The port clients connect to (the TLS port for TLS servers).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The loopback address it binds (127.0.0.1 unless given one of its own).
    pub fn host(&self) -> &str {
        &self.host
    }

    /// `host:port`.
    pub fn addr(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The URL of this server, with credentials when an ACL user is set.
    pub fn url(&self) -> String {
        let scheme = if self.security.tls { "rediss" } else { "redis" };
        match &self.security.user {
            Some((u, p)) => format!("{scheme}://{u}:{p}@{}:{}", self.host, self.port),
            None => format!("{scheme}://{}:{}", self.host, self.port),
        }
    }

    /// The TLS files, for TLS servers.
    pub fn tls_files(&self) -> Option<&TlsFiles> {
        self.tls_files.as_ref()
    }

    /// The directory holding the server's config, log and data.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(|c| c.id())
    }

    /// A client for this server (credentials and TLS set).
    pub fn client(&self) -> Result<redis::Client> {
        let url = self.url();
        Ok(match &self.tls_files {
            Some(f) => redis::Client::build_with_tls(
                url.as_str(),
                redis::TlsCertificates {
                    client_tls: None,
                    root_cert: Some(f.ca_pem()),
                },
            )?,
            None => redis::Client::open(url.as_str())?,
        })
    }

    /// A connection with short deadlines (so a paused server cannot hang a test).
    pub fn conn(&self) -> Result<redis::Connection> {
        let c = self
            .client()?
            .get_connection_with_timeout(Duration::from_secs(2))?;
        c.set_read_timeout(Some(Duration::from_secs(5)))?;
        c.set_write_timeout(Some(Duration::from_secs(5)))?;
        Ok(c)
    }

    /// Runs one command.
    pub fn cmd<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> Result<T> {
        Ok(cmd.query(&mut self.conn()?)?)
    }

    /// Whether the process runs (not killed).
    pub fn is_running(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// kill -9, and reap the process.
    pub fn kill(&mut self) -> Result<()> {
        if let Some(mut c) = self.child.take() {
            c.kill()?;
            c.wait()?;
        }
        Ok(())
    }

    /// SIGSTOP: the process stops answering, its sockets stay open.
    pub fn pause(&self) -> Result<()> {
        self.signal(Signal::SIGSTOP)
    }

    /// SIGCONT after [`Server::pause`].
    pub fn resume(&self) -> Result<()> {
        self.signal(Signal::SIGCONT)
    }

    fn signal(&self, s: Signal) -> Result<()> {
        let pid = self
            .pid()
            .ok_or_else(|| TestkitError::Setup(format!("server {} is not running", self.port)))?;
        kill(Pid::from_raw(pid as i32), s).map_err(|e| TestkitError::Io(e.into()))
    }

    /// Starts the process again (same port, config and data directory) after a kill.
    pub fn restart(&mut self) -> Result<()> {
        self.kill()?;
        self.spawn()
    }

    /// Leaves the process running after this handle is dropped; returns its pid.
    pub fn detach(&mut self) -> Option<u32> {
        self._tmp.take().map(|t| t.keep());
        self.child.take().map(|c| c.id())
    }

    /// The tail of the server's log, for failure messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let log = std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn spawn(&mut self) -> Result<()> {
        let out = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("stdout.log"))?;
        let mut command = Command::new("redis-server");
        if self.own_group {
            // Detached servers must not die with the terminal's Ctrl-C.
            std::os::unix::process::CommandExt::process_group(&mut command, 0);
        }
        let child = command
            .arg(self.dir.join("redis.conf"))
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => TestkitError::RedisServerMissing,
                _ => TestkitError::Io(e),
            })?;
        self.child = Some(child);
        let ready = wait_for("redis-server to accept connections", START_TIMEOUT, || {
            if !self.is_running() {
                return Some(false);
            }
            let pong: Option<String> = self
                .conn()
                .ok()
                .and_then(|mut c| redis::cmd("PING").query(&mut c).ok());
            pong.map(|_| true)
        });
        match ready {
            Ok(true) => Ok(()),
            Ok(false) => {
                self.child.take();
                Err(TestkitError::Setup(format!(
                    "redis-server on port {} exited at start:\n{}",
                    self.port,
                    self.log_tail(10)
                )))
            }
            Err(e) => {
                let _ = self.kill();
                Err(e)
            }
        }
    }

    fn write_config(&self, b: &ServerBuilder, port: u16) -> Result<()> {
        let mut c = String::new();
        let d = self.dir.display();
        let _ = writeln!(c, "bind {}", self.host);
        if self.host != "127.0.0.1" {
            let _ = writeln!(c, "bind-source-addr {}", self.host);
            if b.cluster {
                let _ = writeln!(c, "cluster-announce-ip {}", self.host);
            }
        }
        match &self.tls_files {
            Some(f) => {
                let _ = writeln!(c, "port 0\ntls-port {port}");
                let _ = writeln!(c, "tls-cert-file {}", f.cert.display());
                let _ = writeln!(c, "tls-key-file {}", f.key.display());
                let _ = writeln!(c, "tls-ca-cert-file {}", f.ca_cert.display());
                let _ = writeln!(c, "tls-auth-clients no\ntls-replication yes");
                if b.cluster {
                    let _ = writeln!(c, "tls-cluster yes");
                }
            }
            None => {
                let _ = writeln!(c, "port {port}");
            }
        }
        let _ = writeln!(
            c,
            "dir {d}\nlogfile {d}/redis.log\ndaemonize no\nprotected-mode no"
        );
        let _ = writeln!(
            c,
            "save \"\"\nappendonly no\nrepl-diskless-sync yes\nrepl-diskless-sync-delay 0"
        );
        if b.cluster {
            let _ = writeln!(c, "cluster-enabled yes\ncluster-config-file nodes.conf");
            let _ = writeln!(c, "cluster-node-timeout {}", b.node_timeout_ms);
            let _ = writeln!(c, "cluster-require-full-coverage no");
            let _ = writeln!(c, "cluster-replica-validity-factor 0");
            let _ = writeln!(c, "cluster-allow-replica-migration no");
        }
        if let Some((u, p)) = &self.security.user {
            let _ = writeln!(c, "user default off\nuser {u} on >{p} ~* &* +@all");
            let _ = writeln!(c, "masteruser {u}\nmasterauth {p}");
        }
        for line in &b.extra {
            let _ = writeln!(c, "{line}");
        }
        std::fs::write(self.dir.join("redis.conf"), c)?;
        Ok(())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.kill();
    }
}
