# Resident memory of a fresh node holding 5,000 idle client connections.
# usage: python3 idle_connections.py PATH/TO/gyre   (listens on 127.0.0.1:7790; raise `ulimit -n` first)
import socket, struct, subprocess, sys, time, tempfile, os
gyre = sys.argv[1]
d = tempfile.mkdtemp()
p = subprocess.Popen([gyre, "node", "--data-dir", d + "/data", "--listen", "127.0.0.1:7790", "--shards", "1", "--fsync", "never"], stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
time.sleep(1.5)
def rss():
    for l in open(f"/proc/{p.pid}/status"):
        if l.startswith("VmRSS:"): return int(l.split()[1])
before = rss()
socks = []
for i in range(5000):
    s = socket.create_connection(("127.0.0.1", 7790)); socks.append(s)
time.sleep(1.0)
after = rss()
print(f"{gyre}: rss {before} KiB -> {after} KiB with 5000 idle connections: {(after-before)/5000:.1f} KiB each")
for s in socks: s.close()
p.terminate(); p.wait()
