//! Jupyter for real: Debian's `jupyter notebook` started detached inside the user's container
//! (image `labgate/jupyter:test`, built by `scripts/debian-image jupyter`), bound to the
//! container's 127.0.0.1 as Jupyter is by default, reached from the host with
//! `ssh -N -L PORT:localhost:8888`, its REST API answering with the user's own files.

#![allow(clippy::unwrap_used, clippy::expect_used)] // a panic is how a test fails

mod common;

use std::process::Command;
use std::time::Duration;

use common::{Gateway, Tunnel, ensure_jupyter_image, eventually};

/// User 0 gets the Jupyter image and a uid:gid of its own.
const JUPYTER_USER: &str =
    "[users.{u0}]\nimage = \"labgate/jupyter:test\"\nuid = 1000\ngid = 1001\n";

/// GET `path` through the forward `tunnel` (`-L PORT:localhost:8888`): (HTTP status, body).
fn get(tunnel: &Tunnel, path: &str) -> (String, String) {
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "30", "-w", "\n%{http_code}"])
        .arg(format!("http://127.0.0.1:{}{path}", tunnel.port))
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    match text.rsplit_once('\n') {
        Some((body, code)) => (code.to_owned(), body.to_owned()),
        None => (text, String::new()),
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
    let forward = Tunnel::open(&gw, 0, |port| {
        vec!["-L".into(), format!("127.0.0.1:{port}:localhost:8888")]
    });
    // Jupyter takes a few seconds to start; until then the forward's connection is refused.
    let mut last = (String::new(), String::new());
    let up = eventually(Duration::from_secs(60), || {
        last = get(&forward, "/api");
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
    let (code, body) = get(&forward, &format!("/api/contents/work?token={token}"));
    assert_eq!(code, "200", "{body}");
    assert!(body.contains("\"results.csv\""), "{body}");
    let (code, _) = get(&forward, "/api/contents/work");
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
