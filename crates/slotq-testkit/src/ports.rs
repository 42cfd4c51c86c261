//! Free ports: a random port whose cluster bus port (+10000) is free too.

use std::net::TcpListener;

/// Picks a port `p` in 20000..50000 such that `p` and `p + 10000` can be bound now.
/// Another process may still take it before the server binds; callers retry on failure.
pub(crate) fn free_port() -> u16 {
    use rand::Rng;
    let mut rng = rand::rng();
    loop {
        let p: u16 = rng.random_range(20000..50000);
        if bindable(p) && bindable(p + 10000) {
            return p;
        }
    }
}

pub(crate) fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}
