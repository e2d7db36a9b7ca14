/* Client-matrix member: sd-bus (libsystemd), C.
 *
 *   sdbus_client --address ADDRESS TARGET
 *
 * Adds its match with sd_bus_match_signal() before calling Watch (so nothing is
 * missed), then prints the examples' line format (see examples/README.md).
 * sd-bus answers org.freedesktop.DBus.Peer.Ping itself, in sd_bus_process(), the
 * same loop that dispatches our signals.
 *
 * Build: cc -o sdbus_client sdbus_client.c $(pkg-config --cflags --libs libsystemd)
 */
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <systemd/sd-bus.h>

#define WQD_BUS_NAME "io.wqd.WatchQueue1"
#define WQD_SUB_IFACE "io.wqd.Subscription1"

static int done = 0;

static int
on_signal (sd_bus_message *m, void *userdata, sd_bus_error *ret_error)
{
  const char *member = sd_bus_message_get_member (m);
  int r = 0;

  if (strcmp (member, "KeyChanged") == 0)
    {
      uint32_t key, aux;
      const char *change;
      r = sd_bus_message_read (m, "usu", &key, &change, &aux);
      if (r >= 0)
        printf ("KeyChanged %" PRIu32 " %s %" PRIu32 "\n", key, change, aux);
    }
  else if (strcmp (member, "Lost") == 0)
    {
      uint64_t count;
      r = sd_bus_message_read (m, "t", &count);
      if (r >= 0)
        printf ("Lost %" PRIu64 "\n", count);
    }
  else if (strcmp (member, "Removed") == 0)
    {
      const char *reason;
      r = sd_bus_message_read (m, "s", &reason);
      if (r >= 0)
        printf ("Removed %s\n", reason);
      done = 1;
    }
  if (r < 0)
    fprintf (stderr, "bad %s signal: %s\n", member, strerror (-r));
  fflush (stdout);
  return 0;
}

int
main (int argc, char **argv)
{
  sd_bus *bus = NULL;
  sd_bus_message *reply = NULL;
  sd_bus_error error = SD_BUS_ERROR_NULL;
  const char *path;
  int r;

  if (argc != 4 || strcmp (argv[1], "--address") != 0)
    {
      fprintf (stderr, "usage: %s --address ADDRESS TARGET\n", argv[0]);
      return 2;
    }
  if ((r = sd_bus_new (&bus)) < 0 || (r = sd_bus_set_address (bus, argv[2])) < 0
      || (r = sd_bus_set_bus_client (bus, 1)) < 0 || (r = sd_bus_start (bus)) < 0)
    {
      fprintf (stderr, "cannot connect to %s: %s\n", argv[2], strerror (-r));
      return 1;
    }
  /* sender NULL: the signals are unicast to us, and sd-bus would compare a
   * well-known sender name with the message's unique sender locally. */
  r = sd_bus_match_signal (bus, NULL, NULL, NULL, WQD_SUB_IFACE, NULL, on_signal, NULL);
  if (r < 0)
    {
      fprintf (stderr, "sd_bus_match_signal: %s\n", strerror (-r));
      return 1;
    }
  r = sd_bus_call_method (bus, WQD_BUS_NAME, "/io/wqd/WatchQueue1", "io.wqd.WatchQueue1", "Watch",
                          &error, &reply, "ssa{sv}", "keys", argv[3], 0);
  if (r < 0)
    {
      fprintf (stderr, "Watch failed: %s: %s\n", error.name, error.message);
      return 1;
    }
  if ((r = sd_bus_message_read (reply, "o", &path)) < 0)
    {
      fprintf (stderr, "bad Watch reply: %s\n", strerror (-r));
      return 1;
    }
  printf ("subscribed %s\n", path);
  fflush (stdout);
  sd_bus_message_unref (reply);

  while (!done)
    {
      r = sd_bus_process (bus, NULL);
      if (r < 0)
        {
          fprintf (stderr, "sd_bus_process: %s\n", strerror (-r));
          return 1;
        }
      if (r > 0)
        continue;
      r = sd_bus_wait (bus, UINT64_MAX);
      if (r < 0 && r != -EINTR)
        {
          fprintf (stderr, "sd_bus_wait: %s\n", strerror (-r));
          return 1;
        }
    }
  sd_bus_flush_close_unref (bus);
  return 0;
}
