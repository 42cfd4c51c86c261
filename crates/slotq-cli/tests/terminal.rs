//! What a person sees in a real terminal (tmux): `slotq stats --watch` redraws in place and
//! stops on Ctrl-C; `slotq demo` renders its tables.

use std::process::Command;
use std::time::{Duration, Instant};

use slotq_testkit::ClusterBuilder;

/// A tmux server of our own (its own socket), killed on drop.
struct Tmux {
    socket: String,
}

impl Tmux {
    fn new(cmd: &str) -> Tmux {
        let socket = format!("slotq-test-{}", std::process::id());
        let t = Tmux { socket };
        let ok = t
            .run(&[
                "new-session",
                "-d",
                "-s",
                "t",
                "-x",
                "130",
                "-y",
                "120",
                cmd,
            ])
            .status
            .success();
        assert!(ok, "tmux starts (tests/run.sh installs it)");
        t
    }

    fn run(&self, args: &[&str]) -> std::process::Output {
        Command::new("tmux")
            .args(["-L", &self.socket])
            .args(args)
            .output()
            .expect("tmux is installed (tests/run.sh installs it)")
    }

    fn screen(&self) -> String {
        String::from_utf8_lossy(&self.run(&["capture-pane", "-p", "-t", "t"]).stdout).into_owned()
    }

    fn wait_for(&self, text: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.screen();
            if s.contains(text) {
                return s;
            }
            assert!(
                Instant::now() < deadline,
                "{text:?} never appeared; screen:\n{s}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = self.run(&["kill-server"]);
    }
}

#[test]
fn stats_watch_redraws_in_place_and_stops_on_ctrl_c() {
    let c = ClusterBuilder::new().masters(2).start().unwrap();
    let url = c.url();
    let bin = env!("CARGO_BIN_EXE_slotq");
    let pushed = Command::new(bin)
        .args(["--url", &url, "push", "watched", "a", "b", "c"])
        .status()
        .unwrap();
    assert!(pushed.success());
    let t = Tmux::new(&format!(
        "{bin} --url {url} stats watched --watch 0.2; echo EXITED $?; sleep 30"
    ));
    t.wait_for("refreshing every 0.2 s", Duration::from_secs(10));
    std::thread::sleep(Duration::from_millis(1200));
    let screen = t.screen();
    assert_eq!(
        screen.matches("SHARD").count(),
        1,
        "redrawn in place, not scrolled:\n{screen}"
    );
    assert!(screen.contains("total depth 3"), "{screen}");
    t.run(&["send-keys", "-t", "t", "C-c", ""]);
    let screen = t.wait_for("EXITED 0", Duration::from_secs(5));
    assert!(screen.contains("EXITED 0"));
}

#[test]
fn demo_renders_in_a_terminal() {
    let bin = env!("CARGO_BIN_EXE_slotq");
    let t = Tmux::new(&format!(
        "{bin} demo --replicas 0; echo EXITED $?; sleep 30"
    ));
    let screen = t.wait_for("EXITED", Duration::from_secs(120));
    assert!(screen.contains("EXITED 0"), "{screen}");
    for needle in [
        "MASTER",
        "SHARE",
        "queue orders (registry version 1)",
        "throughput:",
        "the cluster is stopped",
    ] {
        assert!(screen.contains(needle), "missing {needle:?}:\n{screen}");
    }
    // Tables keep their columns aligned on a real terminal.
    let header = screen
        .lines()
        .find(|l| l.starts_with("SHARD "))
        .expect("shard table");
    let row = screen
        .lines()
        .find(|l| l.starts_with("orders#0"))
        .expect("shard row");
    let slot = row.split_whitespace().nth(1).expect("slot column");
    assert_eq!(header.find("SLOT"), row.find(slot), "{header}\n{row}");
}

#[test]
fn a_long_push_shows_progress_on_a_terminal_and_clears_it() {
    let c = ClusterBuilder::new().masters(2).start().unwrap();
    let url = c.url();
    let bin = env!("CARGO_BIN_EXE_slotq");
    let err_file = std::env::temp_dir().join(format!("slotq-progress-{}", std::process::id()));
    let err = err_file.display();
    // Input that lasts a few seconds: a terminal shows a line that counts what was sent.
    let input = "(seq 1 1000; sleep 1.5; seq 1001 2000; sleep 3; seq 2001 3000)";
    let t = Tmux::new(&format!(
        "{input} | {bin} --url {url} push slow; echo EXITED $?; \
         {input} | {bin} --url {url} push piped 2>{err}; sleep 30"
    ));
    let screen = t.wait_for("pushed 2000 message(s), ", Duration::from_secs(10));
    assert!(screen.contains("msg/s"), "{screen}");
    let screen = t.wait_for("EXITED 0", Duration::from_secs(10));
    assert!(
        screen.contains("pushed 3000 message(s) to slow"),
        "{screen}"
    );
    assert!(
        !screen.contains("msg/s"),
        "the progress line is cleared before the summary:\n{screen}"
    );
    // Standard error that is not a terminal gets the summary only.
    let deadline = Instant::now() + Duration::from_secs(15);
    let written = loop {
        let s = std::fs::read_to_string(&err_file).unwrap_or_default();
        if s.contains("pushed") || Instant::now() > deadline {
            break s;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let _ = std::fs::remove_file(&err_file);
    assert_eq!(written, "pushed 3000 message(s) to piped\n");
}
