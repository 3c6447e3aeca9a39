#[derive(Default)]
pub struct Bad;

#[farine::service]
impl Bad {
    #[farine::rpc::method]
    fn not_async(&self, a: i64) -> i64 {
        a
    }

    #[farine::rpc::method]
    async fn borrowed(&self, text: &str) -> usize {
        text.len()
    }

    #[farine::rpc::method]
    async fn pattern(&self, (a, b): (i64, i64)) -> i64 {
        a + b
    }

    #[farine::rpc::client]
    async fn no_service(&self, client: farine::rpc::Client) {
        let _ = client;
    }
}

fn main() {}
