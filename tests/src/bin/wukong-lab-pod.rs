//! The node lab's test workload, run as a Pod from `localhost/wukong-lab/pod:1`; see `wukong_e2e::lab_pod`.

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    wukong_e2e::lab_pod::run().await
}
