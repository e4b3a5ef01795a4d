use super::*;
use std::path::Path;

#[test]
fn explore() {
    let cases = [
        "[server]\nlisten = \"127.0.0.1:22\"\n",
        "",
        "# top\n\n[server]\n\n[defaults]\nmemory = \"1G\"\n",
        "[defaults]\nimage = \"x\"\n[users.bob]\nimage = \"y\"\n[users.bob.mounts]\n",
        "[defaults]\r\nimage = \"x\"\r\nbogus = 1\r\n",
        "[server]\nmax_connections = 0\n[defaults]\nimage = \"x\"\n",
        "[defaults]\nimage = \"x\"\nimage = \"y\"\n",
        "[defaults]\nimage = \"x\"\n[users.carol]\nhome = \"/srv/carol\"\nuid = 5\n",
        "[defaults]\nimage = \"x\"\nmounts = [{ source = \"/srv/../run\", target = \"/r\" }]\n",
        "[defaults]\nimage = \"x\"\nmounts = [{ source = \"/var/run\", target = \"/r\" }]\n",
        "[defaults]\nimage = \"x\"\nmounts = [{ source = \"/var\", target = \"/r\" }]\n",
        "[defaults]\nimage = \"x\"\naccept_env = [\"\"]\n",
        "[defaults]\nimage = \"x\"\naccept_env = [\"PATH_*\"]\n",
        "[defaults]\nimage = \"x\"\n[users.alice]\naccept_env = [\"PATH\"]\n",
        "[defaults]\nimage = \"x\"\nmemory = 0\n",
        "[defaults]\nimage = \"x\"\nshm = 0\n",
        "[docker]\nsocket = \"/srv/d.sock\"\n[defaults]\nimage = \"x\"\nmounts = [{ source = \"/srv\", target = \"/r\" }]\n",
        "[defaults]\nimage = \"x\"\nmounts = [{ source = \"/srv\", target = \"/r\", writable = true, extra = 1 }]\n",
    ];
    for c in cases {
        match parse(Path::new("/etc/labgate/labgate.toml"), c) {
            Ok(cfg) => println!("OK {:?} {:?}\n", cfg.defaults, cfg.users),
            Err(e) => println!("{e}\n"),
        }
    }
}
