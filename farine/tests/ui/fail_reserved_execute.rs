use farine::execute;

#[derive(Default)]
pub struct Worker;

#[farine::service]
impl Worker {
    #[execute]
    async fn work(&self) {}
}

fn main() {}
