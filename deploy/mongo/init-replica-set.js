// Run once by docker-compose.yml's mongo-init service and deploy/k8s's mongo-init Job
// (mongosh --host <first member> --file ...): makes the members the replica set "taskmode", then
// waits until it has a primary. Running it again on an initiated set changes nothing.
// TASKMODE_MONGO_MEMBERS: host:port,host:port,host:port
// MONGO_ROOT_PASSWORD (compose): the members require authentication; log in as the root user the
// image's entrypoint created, and once there is a primary create the services' user `taskmode`
// (readWrite on the taskmode database) with MONGO_TASKMODE_PASSWORD, or reset its password.
const members = (process.env.TASKMODE_MONGO_MEMBERS || "mongo-1:27017,mongo-2:27017,mongo-3:27017").split(",");
const rootPassword = process.env.MONGO_ROOT_PASSWORD || "";
const servicePassword = process.env.MONGO_TASKMODE_PASSWORD || "";
if (rootPassword) db.getSiblingDB("admin").auth("root", rootPassword);

let initiated = true;
try {
  rs.status();
} catch (err) {
  if (err.codeName !== "NotYetInitialized") throw err;
  initiated = false;
}
if (!initiated) {
  rs.initiate({ _id: "taskmode", members: members.map((host, i) => ({ _id: i, host })) });
  print("replica set taskmode initiated with " + members.join(", "));
}

const deadline = Date.now() + 120 * 1000;
while (!db.hello().primary) {
  if (Date.now() > deadline) throw new Error("replica set taskmode elected no primary within 120 s");
  sleep(1000);
}
print("replica set taskmode has primary " + db.hello().primary);

if (servicePassword) {
  // Users are written on the primary, which this member may not be.
  const url = "mongodb://root:" + encodeURIComponent(rootPassword) + "@" + members.join(",") +
    "/admin?replicaSet=taskmode&authSource=admin";
  const admin = connect(url).getSiblingDB("admin");
  const user = { pwd: servicePassword, roles: [{ role: "readWrite", db: "taskmode" }] };
  if (admin.getUser("taskmode")) admin.updateUser("taskmode", user);
  else admin.createUser({ user: "taskmode", ...user });
  print("user taskmode (readWrite on taskmode) is set");
}
