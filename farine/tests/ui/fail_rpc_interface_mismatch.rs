use farine::rpc::Stream;

#[farine::rpc::interface(service = "calc")]
pub trait CalcApi {
    async fn add(&self, a: i64, b: i64) -> i64;
}

#[derive(Default)]
pub struct Calc;

// The server's argument type differs from the interface's: a compile error on the server side.
#[farine::service(implements = CalcApi)]
impl Calc {
    #[farine::rpc::method]
    async fn add(&self, a: i64, b: u32) -> i64 {
        a + i64::from(b)
    }
}

async fn caller(client: CalcApiClient) {
    // The caller passes the wrong type: a compile error on the client side.
    let _ = client.add(1, "two").await;
}

fn main() {
    let _ = caller;
    let _: Option<&dyn Stream<Item = u8>> = None;
}
