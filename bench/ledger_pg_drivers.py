"""asyncpg vs psycopg 3 async: a grouped insert of 50 ledger-shaped rows, and a commit round trip."""
import asyncio, secrets, statistics, sys, time
import asyncpg, psycopg

DSN = "postgresql://postgres@127.0.0.1:5432/test"
COLS = 28
DDL = "CREATE TABLE drvbench (request_id TEXT PRIMARY KEY, ts DOUBLE PRECISION NOT NULL, " + ", ".join(
    f"c{i} {'BIGINT' if i % 3 == 0 else 'TEXT' if i % 3 == 1 else 'DOUBLE PRECISION'}" for i in range(COLS - 2)) + ")"
def row():
    return (secrets.token_hex(16), time.time(), *[(i * 1000 if i % 3 == 0 else f"v{i}" if i % 3 == 1 else 0.25) for i in range(COLS - 2)])

def sql(n, style):
    ph = []
    for r in range(n):
        if style == "dollar":
            ph.append("(" + ", ".join(f"${r*COLS+c+1}" for c in range(COLS)) + ")")
        else:
            ph.append("(" + ", ".join(["%s"] * COLS) + ")")
    return "INSERT INTO drvbench VALUES " + ", ".join(ph) + " ON CONFLICT DO NOTHING"

async def bench_asyncpg(n_iter):
    c = await asyncpg.connect(DSN)
    await c.execute("DROP TABLE IF EXISTS drvbench"); await c.execute(DDL)
    stmt = sql(50, "dollar")
    ins, rt, cpu_ins, cpu_rt = [], [], 0.0, 0.0
    for _ in range(n_iter):
        params = [v for _ in range(50) for v in row()]
        t0, c0 = time.perf_counter(), time.process_time()
        await c.execute(stmt, *params)
        ins.append(time.perf_counter() - t0); cpu_ins += time.process_time() - c0
    one = sql(1, "dollar")
    for _ in range(n_iter):
        p = row()
        t0, c0 = time.perf_counter(), time.process_time()
        await c.execute(one, *p)
        rt.append(time.perf_counter() - t0); cpu_rt += time.process_time() - c0
    # copy variant
    cp = []
    for _ in range(n_iter):
        recs = [row() for _ in range(50)]
        t0 = time.perf_counter()
        await c.copy_records_to_table("drvbench", records=recs)
        cp.append(time.perf_counter() - t0)
    await c.execute("DROP TABLE drvbench"); await c.close()
    return ins, rt, cpu_ins / n_iter, cpu_rt / n_iter, cp

async def bench_psycopg(n_iter):
    c = await psycopg.AsyncConnection.connect(DSN, autocommit=True)
    await c.execute("DROP TABLE IF EXISTS drvbench"); await c.execute(DDL)
    stmt = sql(50, "pct")
    ins, rt, cpu_ins, cpu_rt = [], [], 0.0, 0.0
    for _ in range(n_iter):
        params = [v for _ in range(50) for v in row()]
        t0, c0 = time.perf_counter(), time.process_time()
        await c.execute(stmt, params, prepare=True)
        ins.append(time.perf_counter() - t0); cpu_ins += time.process_time() - c0
    one = sql(1, "pct")
    for _ in range(n_iter):
        p = row()
        t0, c0 = time.perf_counter(), time.process_time()
        await c.execute(one, p, prepare=True)
        rt.append(time.perf_counter() - t0); cpu_rt += time.process_time() - c0
    cp = []
    for _ in range(n_iter):
        recs = [row() for _ in range(50)]
        t0 = time.perf_counter()
        async with c.cursor() as cur:
            async with cur.copy("COPY drvbench FROM STDIN") as copy:
                for r in recs:
                    await copy.write_row(r)
        cp.append(time.perf_counter() - t0)
    await c.execute("DROP TABLE drvbench"); await c.close()
    return ins, rt, cpu_ins / n_iter, cpu_rt / n_iter, cp

def fmt(xs):
    xs = sorted(xs)
    return f"median {statistics.median(xs)*1e3:.3f} ms  p90 {xs[int(len(xs)*0.9)]*1e3:.3f} ms"

async def main():
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    for name, fn in (("asyncpg", bench_asyncpg), ("psycopg", bench_psycopg), ("asyncpg", bench_asyncpg), ("psycopg", bench_psycopg)):
        ins, rt, ci, cr, cp = await fn(n)
        print(f"{name:8} insert50 {fmt(ins)} cpu {ci*1e6:.0f}us | 1-row commit {fmt(rt)} cpu {cr*1e6:.0f}us | COPY50 {fmt(cp)}")

asyncio.run(main())
