use farine::rpc;

#[derive(Default)]
pub struct Server;

#[farine::service]
impl Server {
    #[rpc::method]
    async fn ping(&self) -> String {
        "pong".into()
    }
}

fn main() {}
