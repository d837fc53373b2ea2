use glommio::{LocalExecutorBuilder, io::{OpenOptions, DmaFile}};
use std::time::Instant;
fn main(){
    let ex = LocalExecutorBuilder::default().make().unwrap();
    ex.run(async {
        std::fs::create_dir_all("/tmp/gx").unwrap();
        std::fs::write("/tmp/gx/probe", vec![1u8;4096]).unwrap();
        let p = DmaFile::open("/tmp/gx/probe").await.unwrap();
        let _ = p.read_at(0, 4096).await.unwrap();
        for mode in ["prealloc", "zerofill", "none"] {
            let _ = std::fs::remove_file("/tmp/gx/f");
            let f = OpenOptions::new().read(true).write(true).create(true).dma_open("/tmp/gx/f").await.unwrap();
            let size = 64u64<<20;
            if mode == "prealloc" { f.pre_allocate(size, false).await.unwrap(); }
            if mode == "zerofill" { let mut off=0; while off<size { let mut b=f.alloc_dma_buffer(1<<20); b.as_bytes_mut().fill(0); f.write_at(b, off).await.unwrap(); off+=1<<20;} f.fdatasync().await.unwrap(); }
            let n=2000; let t=Instant::now();
            for i in 0..n { let mut b=f.alloc_dma_buffer(4096); b.as_bytes_mut().fill(7); f.write_at(b, (i as u64)*4096).await.unwrap(); f.fdatasync().await.unwrap(); }
            let e=t.elapsed(); println!("{mode}: {:.1} us per write+fdatasync", e.as_secs_f64()*1e6/n as f64);
            let r = f.read_at(100, 50).await.unwrap(); println!("read ok {}", r.len());
        }
    });
}
