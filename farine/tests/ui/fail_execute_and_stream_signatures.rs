#[derive(Default)]
pub struct Worker;

#[farine::service]
impl Worker {
    #[farine::execute(intervl = "1")]
    async fn configured_in_code(&self) {}

    #[farine::stream::http]
    fn not_async(&self, data: String) {
        let _ = data;
    }
}

fn main() {}
