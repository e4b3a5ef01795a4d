//! Test support for the layers above the seam: a [`Context`] over the in-process fake
//! backend ([`crate::runtime::fake`]) and logins made without SSH.

use std::path::Path;
use std::sync::Arc;

use tokio::sync::watch;

use super::{Context, Login, login_quota};
use crate::auth::Username;
use crate::auth::keys::KeyFile;
use crate::config::Config;
use crate::runtime::fake::FakeRuntime;

const KEY: &str =
    "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIHn7MrEI7ZE5jvoV0hWr8ya2DvjoZH2sGUTMv7Ur2DPt";

pub(crate) fn config(extra: &str) -> Config {
    crate::config::parse(
        Path::new("/etc/labgate/labgate.toml"),
        &format!("[defaults]\nimage = \"lab/base:1\"\nmemory = \"1G\"\n{extra}"),
    )
    .unwrap()
}

pub(crate) fn context(config: Config) -> (Arc<Context>, Arc<FakeRuntime>) {
    let fake = Arc::new(FakeRuntime::default());
    let config = watch::channel(Arc::new(config)).1;
    let accounting = Arc::new(crate::accounting::Accounting::in_memory());
    let ctx = Arc::new(Context {
        gpu_line: super::gpuline::GpuLine::new(config.clone(), accounting.clone()),
        accounting,
        config,
        runtime: fake.clone(),
        connections: Arc::default(),
        idle: Default::default(),
        pending: Arc::default(),
        identities: Arc::default(),
        activity: Default::default(),
        notices: Default::default(),
    });
    (ctx, fake)
}

pub(crate) fn user(name: &str) -> Username {
    Username::parse(name).unwrap()
}

pub(crate) fn login(ctx: &Context, name: &str, profile: Option<&str>) -> Login {
    let user = user(name);
    let profile = profile.map(|p| crate::auth::ProfileName::parse(p).unwrap());
    let (quota, denied) = login_quota(ctx, &user, profile.as_ref());
    let key = KeyFile::parse(Path::new("keys/x.pub"), KEY).keys[0].clone();
    Login {
        user,
        key,
        quota,
        denied,
        peer: "192.0.2.7:40000".parse().unwrap(),
        local: "192.0.2.1:22".parse().unwrap(),
        conn: 1,
        stats: Arc::default(),
        gone: Default::default(),
        opening: Arc::default(),
        identity: Ok(None),
    }
}
