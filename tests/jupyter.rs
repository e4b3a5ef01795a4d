//! Jupyter for real: Debian's `jupyter notebook` started detached inside the user's container
//! (image `labgate/jupyter:test`, built by `scripts/debian-image jupyter`), bound to the
//! container's 127.0.0.1 as Jupyter is by default, reached from the host with
//! `ssh -N -L PORT:localhost:8888`, its REST API answering with the user's own files.

mod common;

use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Gateway, ensure_jupyter_image, eventually};

/// User 0 gets the Jupyter image and a uid:gid of its own.
const JUPYTER_USER: &str =
    "[users.{u0}]\nimage = \"labgate/jupyter:test\"\nuid = 1000\ngid = 1001\n";

/// `ssh -N -L 127.0.0.1:PORT:localhost:8888`, the local port picked by trying random ones with
/// ExitOnForwardFailure (no port is bound and dropped); killed on drop.
struct Forward {
    child: Child,
    port: u16,
}

impl Forward {
    fn open(gw: &Gateway) -> Forward {
        for attempt in 0..20u32 {
            let port = 20_000
                + ((std::process::id().wrapping_mul(4099) + attempt * 104_729 + 7) % 40_000) as u16;
            let mut child = gw
                .ssh(0)
                .args(["-N", "-o", "ExitOnForwardFailure=yes", "-L"])
                .arg(format!("127.0.0.1:{port}:localhost:8888"))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap();
            let ready = eventually(Duration::from_secs(20), || {
                matches!(child.try_wait(), Ok(Some(_)))
                    || TcpStream::connect(("127.0.0.1", port)).is_ok()
            });
            if ready && matches!(child.try_wait(), Ok(None)) {
                return Forward { child, port };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("could not open -L; gateway log:\n{}", gw.log());
    }

    /// GET `path` through the forward: (HTTP status, body).
    fn get(&self, path: &str) -> (String, String) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
            .arg(format!("http://127.0.0.1:{}{path}", self.port))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        match text.rsplit_once('\n') {
            Some((body, code)) => (code.to_owned(), body.to_owned()),
            None => (text, String::new()),
        }
    }
}

impl Drop for Forward {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn jupyter_notebook_inside_the_container_answers_through_l_localhost_8888() {
    ensure_jupyter_image();
    let gw = Gateway::start(1, "", JUPYTER_USER);
    let token = format!("t{}", std::process::id());
    // As a user would: start it in the background so it outlives the ssh command.
    gw.ok(
        0,
        &format!(
            "mkdir -p work && echo data > work/results.csv && \
             setsid nohup jupyter notebook --ip=127.0.0.1 --port 8888 --no-browser \
             --NotebookApp.token={token} > jupyter.log 2>&1 < /dev/null &"
        ),
    );
    let forward = Forward::open(&gw);
    // Jupyter takes a few seconds to start; until then the forward's connection is refused.
    let mut last = (String::new(), String::new());
    let up = eventually(Duration::from_secs(60), || {
        last = forward.get("/api");
        last.0 == "200"
    });
    let log = gw.run(0, "cat jupyter.log").stdout;
    assert!(
        up,
        "Jupyter did not answer /api: {last:?}\njupyter.log:\n{}",
        String::from_utf8_lossy(&log)
    );
    assert!(last.1.contains("\"version\""), "{last:?}");

    // The API lists the user's own home, with the token; without it, it refuses.
    let (code, body) = forward.get(&format!("/api/contents/work?token={token}"));
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"results.csv\""), "{body}");
    let (code, _) = forward.get("/api/contents/work");
    assert_eq!(code, "403", "the API needs the token");

    // The notebook runs as the configured uid, bound to the container's loopback only.
    let ps = gw.ok(
        0,
        "ps -o uid=,args= -C jupyter-notebook -C python3 | grep notebook",
    );
    assert!(ps.trim_start().starts_with("1000 "), "{ps}");
    let bound = gw.ok(0, "cat /proc/net/tcp | awk '$4 == \"0A\" {print $2}'");
    assert!(
        bound.contains("0100007F:22B8"),
        "listening on 127.0.0.1:8888: {bound}"
    );
}
