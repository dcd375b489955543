//! A call-handling service that decides `CheckSeat` in process: `cargo run -p
//! comtrexx-licensing-client --example call_handling -- http://127.0.0.1:50051 alice`.
//! README.md shows the body of `main` (a test keeps the two the same).

use comtrexx_licensing_client::{Client, Config, Decision, Feature};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let endpoint = args
        .next()
        .unwrap_or_else(|| "http://127.0.0.1:50051".into());
    let user = args.next().unwrap_or_else(|| "alice".into());
    // --- README ---
    let licensing = Client::start(Config {
        endpoints: vec![endpoint],                  // every replica, for failover
        cache_file: Some("licensing.cache".into()), // decide at once after a restart
        ..Config::default()
    })?;
    licensing.ready().await; // a copy: from the stream or the cache file
    match licensing.check_seat(&user, Feature::User) {
        Decision::Known(a) if a.licensed => println!("{user}: place the call"),
        Decision::Known(a) => println!("{user}: not licensed ({:?})", a.reason),
        Decision::Unknown => println!("{user}: no copy yet: apply your own policy"),
    }
    // --- README ---
    Ok(())
}
